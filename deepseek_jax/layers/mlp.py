"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and the MoE's shared experts); with a
``limit`` (DeepSeek-V4's ``swiglu_limit``) the gate is clamped from above and the up projection on both sides."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import Linear


class MLP(nn.Module):
    intermediate_size: int
    options: ModelOptions
    init_std: float = 0.02
    limit: Optional[float] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        o, i, std = self.options, self.intermediate_size, self.init_std
        gate = Linear((i,), ("embed", "mlp"), o, init_std=std, name="gate_proj")(x)
        up = Linear((i,), ("embed", "mlp"), o, init_std=std, name="up_proj")(x)
        h = swiglu_act(gate, up, self.limit)
        return Linear((x.shape[-1],), ("mlp", "embed"), o, init_std=std, name="down_proj")(h)


def swiglu_act(gate: jax.Array, up: jax.Array, limit: Optional[float] = None) -> jax.Array:
    """``silu(gate) * up``, with ``gate <= limit`` and ``|up| <= limit`` first when a limit is given."""
    if limit is not None:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up
