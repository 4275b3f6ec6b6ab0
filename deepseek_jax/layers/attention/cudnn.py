"""cuDNN's fused flash attention on GPU, through ``jax.nn.dot_product_attention``, for rows that are one document
each (packed rows take the blockwise core)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.blockwise import DEFAULT_BLOCK, blockwise_attention
from deepseek_jax.layers.attention.layout import Layout


def single_document(segment: jax.Array) -> jax.Array:
    """``[]`` bool: every row of ``segment [B,T]`` is one document from place 0 followed by padding (segment 0):
    ``s, .., s, 0, .., 0``, the layout that per-row lengths describe."""
    length = jnp.sum(segment > 0, axis=1, keepdims=True)
    place = jnp.arange(segment.shape[1])[None]
    return jnp.all(segment == jnp.where(place < length, segment[:, :1], 0))


def cudnn_attention(q, k, v, layout: Layout, scale: float, block: int = DEFAULT_BLOCK,
                    implementation: str = "cudnn") -> jax.Array:
    """A row's causal self-attention (query and key t at place t, ``T == S``) by ``jax.nn.dot_product_attention``
    (``implementation="cudnn"``: cuDNN's fused flash attention on GPU; "xla" materializes the scores: for tests).

    It takes no segment ids, only per-row lengths, so it runs when every row is one document followed by
    padding (``single_document``, checked on the values: right-padded prompts, unpacked training rows); packed
    rows take the blockwise core (``lax.cond``: both are compiled, one runs). It needs V's head dim equal to
    q/k's: V is padded with zeros to Dk (no score changes; the extra output columns are 0) and the output sliced
    back to Dv. Rows of padding give 0, as in the other cores."""
    dk, dv = q.shape[-1], v.shape[-1]
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"cudnn attention is a row's self-attention: {q.shape[1]} queries but {k.shape[1]} keys")

    def fused(q, k, v):
        lengths = jnp.sum(layout.q_segment > 0, axis=1).astype(jnp.int32)
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dk - dv))) if dv < dk else v
        out = jax.nn.dot_product_attention(q, k, vp, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths, implementation=implementation)
        return jnp.where((layout.q_segment > 0)[:, :, None, None], out[..., :dv], 0).astype(v.dtype)

    def packed(q, k, v):
        return blockwise_attention(q, k, v, layout, scale, block, block).astype(v.dtype)

    return jax.lax.cond(single_document(layout.q_segment), fused, packed, q, k, v)


