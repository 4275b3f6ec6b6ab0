"""RMSNorm, computed in fp32 as the reference does, then scaled in the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.options import ModelOptions


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``scale * x / sqrt(mean(x**2) + eps)``; the statistic in fp32, the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    axis_name: str
    options: ModelOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.options.params_dtype,
        )
        return rms_norm(x, scale, self.eps)
