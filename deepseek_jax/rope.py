"""Rotary position embedding with YaRN (DeepSeek-V2 section 2.1.3, Peng et al. 2023), interleaved pairs.

The released checkpoints were trained with rope applied to interleaved pairs ``(x0, x1), (x2, x3), ...``;
we rotate those pairs in place (no weight permutation, as in the official inference code). transformers
de-interleaves at run time instead; attention scores are identical either way, only the layout of cached
rope keys differs by a fixed permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim index whose wavelength fits ``num_rotations`` times into ``max_pos`` tokens."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[qk_rope_head_dim // 2]`` (float32), YaRN-blended when ``rope_scaling`` is set."""
    dim = config.qk_rope_head_dim
    base = np.float32(config.rope_theta)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return extrapolation
    interpolation = (np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)
    orig = rs.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(rs.beta_fast, dim, config.rope_theta, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(rs.beta_slow, dim, config.rope_theta, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1.0) - ramp).astype(np.float32)
    freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return freq.astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """YaRN's cos/sin multiplier ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1.0 when off)."""
    rs = config.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_get_mscale(rs.factor)


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``[*positions.shape, qk_rope_head_dim // 2]`` in fp32."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(config)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of ``x [B, T, H, d]`` by ``cos/sin [B, T, d/2]``; fp32 math, x's dtype out."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
