"""Multi-token prediction module (DeepSeek-V3 section 2.2; REFERENCE.md section 3).

Depth k combines the previous depth's hidden state h_i (depth 0: the main model's output after its final
norm, as transformers' MtpModel and the serving engines feed it) with the embedding of token t_{i+k}:
``h' = eh_proj(concat(enorm(emb), hnorm(h)))`` (embedding first, as the checkpoint's ``eh_proj`` expects),
then one full decoder block, then ``shared_head.norm``. Embedding and output head are the main model's.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .block import Block, CachedBlock
from .config import ModelConfig
from .linear import Linear
from .norm import RMSNorm
from .options import ModelOptions


class MTPModule(nn.Module):
    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, h_prev, emb, cos, sin, layout, valid):
        """h_prev, emb ``[B, T', D]`` aligned (emb is of the token k places ahead) -> normed hidden, stats."""
        c, o = self.config, self.options
        e = RMSNorm(c.rms_norm_eps, "embed", o, name="enorm")(emb)
        h = RMSNorm(c.rms_norm_eps, "embed", o, name="hnorm")(h_prev)
        x = Linear((c.hidden_size,), ("mtp_concat", "embed"), o, init_std=c.initializer_range, name="eh_proj")(
            jnp.concatenate([e, h], axis=-1)
        )
        x, stats = Block(c, o, moe=c.n_routed_experts > 0, name="block")(x, cos, sin, layout, valid)
        return RMSNorm(c.rms_norm_eps, "embed", o, name="shared_head_norm")(x), stats


class CachedMTPModule(nn.Module):
    """``MTPModule`` (same parameter names) over a latent KV cache, for drafting in speculative decoding.

    Row i pairs h_prev of position p-1 with the embedding of token p; its rope position is p, and it is
    cached in slot p (slot 0 never holds a valid row).
    """

    config: ModelConfig
    options: ModelOptions
    attn: str = "absorbed"

    @nn.compact
    def __call__(self, h_prev, emb, layer_cache, cos, sin, layout, valid):
        c, o = self.config, self.options
        e = RMSNorm(c.rms_norm_eps, "embed", o, name="enorm")(emb)
        h = RMSNorm(c.rms_norm_eps, "embed", o, name="hnorm")(h_prev)
        x = Linear((c.hidden_size,), ("mtp_concat", "embed"), o, init_std=c.initializer_range, name="eh_proj")(
            jnp.concatenate([e, h], axis=-1)
        )
        x, latents = CachedBlock(c, o, moe=c.n_routed_experts > 0, attn=self.attn, name="block")(
            x, layer_cache, cos, sin, layout, valid)
        return RMSNorm(c.rms_norm_eps, "embed", o, name="shared_head_norm")(x), latents
