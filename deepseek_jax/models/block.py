"""Pre-norm decoder block: ``h += attn(norm(h)); h += FFN(norm(h))``; attn is MLA (DeepSeek) or GQA (the dense
R1-Distill students), FFN a dense MLP or an MoE.

One block serves training and inference; ``mode`` says which attention path runs and what the block returns:
- "train": the full attention path over the rows; returns the MoE's router statistics (None for a dense FFN);
- "prefill": the full path over whole prompts; returns the new tokens' cache values (MLA's latent ``c_kv,
  k_pe``; GQA's keys and values) for the caller to write;
- "decode": new tokens attending to the layer's cache entry plus themselves (MLA's absorbed path, or the expanded
  one with ``absorb=False``); returns the new tokens' cache values.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions, remat_policy
from deepseek_jax.layers import kv_cache
from deepseek_jax.layers.attention.layout import Layout
from deepseek_jax.layers.gqa import GQA
from deepseek_jax.layers.lora import DROPOUT_RNG
from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.moe.layer import MoE
from deepseek_jax.parallel.rules import constrain

ACT = ("act_batch", "act_length", "act_embed")
MODES = ("train", "prefill", "decode")


def attention_module(config: ModelConfig):
    """The attention layer a config uses: ``MLA`` or ``GQA``, both with ``prefill`` and ``decode``."""
    return MLA if config.uses_mla else GQA


class Block(nn.Module):
    """One decoder layer. ``__call__(h, layer_cache, cos, sin, layout, segments) -> (h, out)``; ``out`` per ``mode``
    (module docstring). ``layer_cache``: this layer's cache entry (``layers/kv_cache.py`` layout, ``[B,S,.]``
    leaves) in "decode", None otherwise. ``layout``: the rows' own tokens (train, prefill), or the cached slots
    followed by the new tokens (decode; ``layers/attention/layout.py``'s ``cache_layout``).

    The signature is ``nn.scan``-shaped: the hidden state is the carry, the cache entry is scanned over, the rest
    are broadcast. ``rematerialized``: the layer runs under ``nn.remat`` (its forward pass is recomputed in the
    backward).
    """

    config: ModelConfig
    options: ModelOptions
    moe: bool
    mode: str = "train"
    absorb: bool = True
    rematerialized: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, layer_cache, cos: jax.Array, sin: jax.Array, layout: Layout,
                 segments: jax.Array):
        c, o = self.config, self.options
        if self.mode != "decode":  # whole rows: split like training activations (batch; context when long)
            h = constrain(h, ACT)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="input_layernorm")(h)
        attn = attention_module(c)(c, o, name="self_attn")
        new = None
        if self.mode == "train":
            a = attn(x, cos, sin, layout)
        elif self.mode == "prefill":
            a, *new = attn.prefill(x, cos, sin, layout)
        else:
            absorb = {"absorb": self.absorb} if c.uses_mla else {}  # GQA caches keys and values: nothing to absorb
            cached = kv_cache.read(layer_cache, o.compute_dtype)
            if len(cached) == 3:  # V3.2: the latent, the rope key and the indexer's key
                absorb["index_k_cache"] = cached[2]
            a, *new = attn.decode(x, cos, sin, *cached[:2], layout, **absorb)
        h = h + a
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="post_attention_layernorm")(h)
        if self.moe:
            y, stats = MoE(c, o, self.rematerialized, name="mlp")(x, segments)
        else:
            y, stats = MLP(c.intermediate_size, o, c.initializer_range, name="mlp")(x), None
        if self.mode == "train":
            return constrain(h + y, ACT), stats
        return h + y, tuple(new)


def scanned(block, options: ModelOptions, length: int, train: bool, broadcast: int = 4):
    """One run of ``length`` scanned blocks (``Block``, or V4's ``V4Block``): the hidden state carried, a cache
    entry (or None) scanned over layer by layer, the ``broadcast`` arguments after it shared by every layer; in
    training under ``nn.remat`` when ``options.remat`` asks."""
    if train and options.remat != "none":
        block = nn.remat(block, policy=remat_policy(options.remat), prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0, "indexer_kl": 0},
        split_rngs={"params": True, DROPOUT_RNG: True},  # each layer its own adapter-dropout masks
        in_axes=(0,) + (nn.broadcast,) * broadcast,
        length=length,
        unroll=min(options.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
