"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and the MoE's shared experts)."""

from __future__ import annotations

import flax.linen as nn
import jax

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import Linear


class MLP(nn.Module):
    intermediate_size: int
    options: ModelOptions
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        o, i, std = self.options, self.intermediate_size, self.init_std
        gate = Linear((i,), ("embed", "mlp"), o, init_std=std, name="gate_proj")(x)
        up = Linear((i,), ("embed", "mlp"), o, init_std=std, name="up_proj")(x)
        return Linear((x.shape[-1],), ("mlp", "embed"), o, init_std=std, name="down_proj")(jax.nn.silu(gate) * up)
