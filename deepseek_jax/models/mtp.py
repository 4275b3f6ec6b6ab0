"""Multi-token prediction module (DeepSeek-V3 section 2.2; docs/reference.md, section 3).

Depth k combines the previous depth's hidden state h_i (depth 0: the main model's output after its final
norm, as transformers' MtpModel and the serving engines feed it) with the embedding of token t_{i+k}:
``h' = eh_proj(concat(enorm(emb), hnorm(h)))`` (embedding first, as the checkpoint's ``eh_proj`` expects),
then one full decoder block, then ``shared_head.norm``. Embedding and output head are the main model's.

In training the module predicts a further token of every row. In inference it is the draft model of
speculative decoding (``mode`` "prefill" / "decode", as ``Block``): row i pairs h_prev of position p-1 with the
embedding of token p; its rope position is p, and it is cached in slot p (slot 0 never holds a valid row).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.models.block import Block


class MTPModule(nn.Module):
    config: ModelConfig
    options: ModelOptions
    mode: str = "train"
    absorb: bool = True

    @nn.compact
    def __call__(self, h_prev, emb, layer_cache, cos, sin, layout, segments):
        """h_prev, emb ``[B, T', D]`` aligned (emb is of the token k places ahead) -> the normed hidden state and
        the block's output (``Block``: router statistics in training, the new cache values in inference)."""
        c, o = self.config, self.options
        e = RMSNorm(c.rms_norm_eps, "embed", o, name="enorm")(emb)
        h = RMSNorm(c.rms_norm_eps, "embed", o, name="hnorm")(h_prev)
        x = Linear((c.hidden_size,), ("mtp_concat", "embed"), o, init_std=c.initializer_range, name="eh_proj")(
            jnp.concatenate([e, h], axis=-1)
        )
        x, out = Block(c, o, moe=c.n_routed_experts > 0, mode=self.mode, absorb=self.absorb, name="block")(
            x, layer_cache, cos, sin, layout, segments)
        return RMSNorm(c.rms_norm_eps, "embed", o, name="shared_head_norm")(x), out
