"""Pre-norm decoder block: ``h += attn(norm(h)); h += FFN(norm(h))``; attn is MLA (DeepSeek) or GQA (the dense
R1-Distill students), FFN a dense MLP or an MoE."""

from __future__ import annotations

import flax.linen as nn
import jax

from . import kvcache
from .attention import Layout
from .config import ModelConfig
from .gqa import GQA
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .options import ModelOptions
from .sharding import constrain

ACT = ("act_batch", "act_length", "act_embed")


def attention_module(config: ModelConfig):
    """The attention layer a config uses: ``MLA`` or ``GQA``, both with ``prefill`` and ``decode``."""
    return MLA if config.uses_mla else GQA


class Block(nn.Module):
    """One decoder layer. ``__call__(h, cos, sin, layout, valid) -> (h, router_stats or None)``.

    The signature is ``nn.scan``-shaped: the hidden state is the carry, the rest are broadcast.
    ``rematerialized``: the layer runs under ``nn.remat`` (its forward pass is recomputed in the backward).
    """

    config: ModelConfig
    options: ModelOptions
    moe: bool
    rematerialized: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, layout: Layout, valid: jax.Array):
        c, o = self.config, self.options
        h = constrain(h, ACT)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="input_layernorm")(h)
        h = h + attention_module(c)(c, o, name="self_attn")(x, cos, sin, layout)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="post_attention_layernorm")(h)
        if self.moe:
            y, stats = MoE(c, o, self.rematerialized, name="mlp")(x, valid)
        else:
            y, stats = MLP(c.intermediate_size, o, c.initializer_range, name="mlp")(x), None
        return constrain(h + y, ACT), stats


class CachedBlock(nn.Module):
    """The same layer (same parameter names as ``Block``) for inference over a KV cache (MLA: the latent;
    GQA: keys and values).

    ``attn``: "full" (prefill: the full MLA path over the prompt; ``layout`` over its T tokens), "absorbed" or
    "naive" (decode over the cache; ``layout``'s keys are the S slots then the T new tokens, see
    ``decode.cache_layout``).
    ``__call__(h, layer_cache, cos, sin, layout, valid) -> (h, (c_kv, k_pe) of the new tokens)``; layer_cache
    is this layer's cache entry (``kvcache`` layout, ``[B,S,.]`` leaves), or None for "full".
    """

    config: ModelConfig
    options: ModelOptions
    moe: bool
    attn: str = "absorbed"

    @nn.compact
    def __call__(self, h: jax.Array, layer_cache, cos: jax.Array, sin: jax.Array, layout: Layout,
                 valid: jax.Array):
        c, o = self.config, self.options
        if self.attn == "full":  # a whole prompt: split like training activations (batch; context when long)
            h = constrain(h, ACT)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="input_layernorm")(h)
        mla = attention_module(c)(c, o, name="self_attn")
        if self.attn == "full":
            a, c_kv, k_pe = mla.prefill(x, cos, sin, layout)
        else:
            c_cache, pe_cache = kvcache.read(layer_cache, o.compute_dtype)
            a, c_kv, k_pe = mla.decode(x, cos, sin, c_cache, pe_cache, layout, absorb=self.attn == "absorbed")
        h = h + a
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="post_attention_layernorm")(h)
        if self.moe:
            y, _ = MoE(c, o, name="mlp")(x, valid)
        else:
            y = MLP(c.intermediate_size, o, c.initializer_range, name="mlp")(x)
        return h + y, (c_kv, k_pe)
