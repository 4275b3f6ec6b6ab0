"""Rotary position embedding with YaRN (DeepSeek-V2 section 2.1.3, Peng et al. 2023), interleaved pairs.

The released checkpoints were trained with rope applied to interleaved pairs ``(x0, x1), (x2, x3), ...``;
we rotate those pairs in place (no weight permutation, as in the official inference code). transformers
de-interleaves at run time instead; attention scores are identical either way, only the layout of cached
rope keys differs by a fixed permutation. A V3 config with ``rope_interleave: false`` pairs the two halves
``(x_i, x_{i+d/2})`` instead, as transformers' ``rotate_half`` does for such checkpoints.

The dense R1-Distill students rotate the halves of each whole head, with plain frequencies (Qwen2) or Llama 3.1's
``llama3`` scaling (long wavelengths divided by ``factor``, a smooth blend between, short ones kept).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig, yarn_get_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim index whose wavelength fits ``num_rotations`` times into ``max_pos`` tokens."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _llama3_inv_freq(inv_freq: np.ndarray, rs) -> np.ndarray:
    """Llama 3.1's scaling: a wavelength longer than ``original / low_freq_factor`` is divided by ``factor``,
    one shorter than ``original / high_freq_factor`` is kept, and those between blend the two by
    ``smooth = (original / wavelength - low) / (high - low)``."""
    orig, factor = np.float32(rs.original_max_position_embeddings), np.float32(rs.factor)
    low, high = np.float32(rs.low_freq_factor), np.float32(rs.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[config.rope_dim // 2]`` (float32), YaRN- or llama3-scaled by ``rope_scaling``."""
    dim = config.rope_dim
    base = np.float32(config.rope_theta)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return extrapolation
    if rs.type == "llama3":
        return _llama3_inv_freq(extrapolation, rs)
    interpolation = (np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)
    orig = rs.original_max_position_embeddings
    low = _yarn_correction_dim(rs.beta_fast, dim, config.rope_theta, orig)
    high = _yarn_correction_dim(rs.beta_slow, dim, config.rope_theta, orig)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1.0) - ramp).astype(np.float32)
    freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return freq.astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """YaRN's cos/sin multiplier (1.0 when off): ``attention_factor`` when config.json gives it, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given, else ``mscale(factor)``."""
    rs = config.rope_scaling
    if rs is None or rs.type == "llama3":
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_get_mscale(rs.factor)


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``[*positions.shape, config.rope_dim // 2]`` in fp32."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(config)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool = True) -> jax.Array:
    """Rotate pairs of ``x [B, T, H, d]`` by ``cos/sin [B, T, d/2]``; fp32 math, x's dtype out.

    ``interleave``: pair i is ``(x_{2i}, x_{2i+1})`` (the released checkpoints); else ``(x_i, x_{i+d/2})``.
    """
    x32 = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if not interleave:
        a, b = jnp.split(x32, 2, axis=-1)
        return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(x.dtype)
    x32 = x32.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = x32[..., 0], x32[..., 1]
    out = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
