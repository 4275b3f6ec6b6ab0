"""The attention core a layer calls: one of the cores below, chosen by ``ModelOptions.attention`` and the platform.

- ``reference.py``: naive (the whole score matrix; the reference, and the core within one block);
- ``blockwise.py``: online softmax with its own backward, O(T x block) memory;
- ``splash.py``: the Pallas TPU splash kernel;
- ``cudnn.py``: cuDNN's fused attention on GPU;
- ``context_parallel.py``: any of them with the queries split over the context axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.blockwise import DEFAULT_BLOCK, blockwise_attention
from deepseek_jax.layers.attention.cudnn import cudnn_attention
from deepseek_jax.layers.attention.layout import Layout
from deepseek_jax.layers.attention.reference import naive_attention
from deepseek_jax.layers.attention.splash import splash_attention

ATTENTION_IMPLS = ("auto", "blockwise", "naive", "splash", "cudnn")


def attention(q, k, v, layout: Layout, scale: float, impl: str = "auto", block: int = DEFAULT_BLOCK,
              platform: str = "cpu", self_attention: bool = False) -> jax.Array:
    """The attention core: ``impl`` "naive", "blockwise", "splash", "cudnn", or "auto": for queries or keys
    spanning more than one block, when ``self_attention`` (the layout is a row's own tokens at places 0..T-1, as
    in training and prefill) splash on TPU and cuDNN on GPU for 16-bit inputs, blockwise otherwise; naive within
    one block.
    On CPU low-precision inputs are computed in fp32 (XLA:CPU has no bf16 x bf16 -> fp32 dot for some of these
    shapes, and no fast bf16 one), the output cast back."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    dtype = v.dtype
    long = max(q.shape[1], k.shape[1]) > block
    if impl == "auto" and long and platform == "tpu" and self_attention:
        impl = "splash"
    if impl == "auto" and long and platform == "gpu" and self_attention and dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    if impl == "cudnn":
        if not self_attention:
            raise ValueError("attention impl 'cudnn' needs a row's self-attention layout (training or prefill)")
        return cudnn_attention(q, k, v, layout, scale, block, "cudnn" if platform == "gpu" else "xla")
    if impl == "splash":
        if not self_attention:
            raise ValueError("attention impl 'splash' needs a row's self-attention layout (training or prefill)")
        return splash_attention(q, k, v, layout.q_segment, layout.k_segment, scale, block,
                                interpret=platform != "tpu")
    if platform == "cpu" and dtype != jnp.float32:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if impl == "naive" or (impl == "auto" and not long):
        return naive_attention(q, k, v, layout, scale).astype(dtype)
    return blockwise_attention(q, k, v, layout, scale, block, block).astype(dtype)
