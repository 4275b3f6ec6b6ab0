"""Pre-norm decoder block: ``h += MLA(norm(h)); h += FFN(norm(h))`` with a dense MLP or an MoE."""

from __future__ import annotations

import flax.linen as nn
import jax

from .config import ModelConfig
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .options import ModelOptions

ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """One decoder layer. ``__call__(h, cos, sin, mask, valid) -> (h, router_stats or None)``.

    The signature is ``nn.scan``-shaped: the hidden state is the carry, the rest are broadcast.
    """

    config: ModelConfig
    options: ModelOptions
    moe: bool

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, valid: jax.Array):
        c, o = self.config, self.options
        h = nn.with_logical_constraint(h, ACT)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="input_layernorm")(h)
        h = h + MLA(c, o, name="self_attn")(x, cos, sin, mask)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="post_attention_layernorm")(h)
        if self.moe:
            y, stats = MoE(c, o, name="mlp")(x, valid)
        else:
            y, stats = MLP(c.intermediate_size, o, c.initializer_range, name="mlp")(x), None
        return nn.with_logical_constraint(h + y, ACT), stats
