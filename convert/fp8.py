"""DeepSeek's FP8 weight format (REFERENCE.md section 4): e4m3fn weights with 128x128 block ``scale_inv``.

``dequantize_fp8_blocks`` (numpy, used on read) lives in ``deepseek_jax.checkpoint``; here are its inverse for
``export --fp8`` and a jax version for restoring ``--keep-fp8`` checkpoints onto a mesh.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint import FP8_BLOCK

E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def quantize_fp8_blocks(w: np.ndarray, block: int = FP8_BLOCK, ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, cols]`` -> (e4m3fn weight, fp32 ``scale_inv`` ``[ceil(rows/block), ceil(cols/block)]``).

    Per block ``scale_inv = amax / 448`` (rounded up to a power of two with ``ue8m0``, V3.1's ``scale_fmt``),
    so that ``W ~= W8 * scale_inv``. Values are clipped to +-448 before the cast: e4m3fn has no infinity and
    an overflowing cast gives NaN.
    """
    rows, cols = w.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    w = np.asarray(w, np.float32)
    padded = np.zeros((br * block, bc * block), np.float32)
    padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(br, block, bc, block)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    if ue8m0:
        scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[:rows, :cols]
    w8 = np.clip(w / full, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return w8, scale


def is_power_of_two_scales(scale_inv: np.ndarray) -> bool:
    """True when every scale is an exact power of two (a ``ue8m0`` checkpoint)."""
    m, _ = np.frexp(np.asarray(scale_inv, np.float32))
    return bool(np.all(m == 0.5))


def dequantize_ours_jax(kernel8, scale_inv, hf_shape: tuple[int, int], dtype, block: int = FP8_BLOCK):
    """Dequantize a kept-FP8 leaf in our layout (jax arrays, any sharding).

    kernel8: ``lead + item_shape``, the transposed ``[in, out]`` weight reshaped into our layout.
    scale_inv: ``lead + [ceil(in/block), ceil(out/block)]`` (the HF scale, transposed like the weight).
    """
    import jax.numpy as jnp

    out_dim, in_dim = hf_shape
    lead = scale_inv.shape[:-2]
    k = kernel8.reshape(lead + (in_dim, out_dim)).astype(jnp.float32)
    s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), block, axis=-2), block, axis=-1)
    s = s[..., :in_dim, :out_dim]
    return (k * s).astype(dtype).reshape(kernel8.shape)
