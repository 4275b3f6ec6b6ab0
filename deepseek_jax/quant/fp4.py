"""FP4 (e2m1) weights as DeepSeek-V4's releases store the MoE experts, read on the host.

The format (``docs/reference.md``; transformers' ``FineGrainedFP8Config(expert_dtype="fp4")`` reads the same):
- the weight ``[out, in]`` is stored as ``int8`` ``[out, in / 2]``, two e2m1 codes per byte, the low nibble the
  even column (``in`` index ``2j``), the high nibble the odd one;
- its scale ``[out, in / 32]`` (one per row and 32 consecutive inputs), stored as ``float8_e8m0fnu`` (a power of
  two) or float32, beside the weight under the same name as FP8's (``<name>.scale`` in the release, read as
  ``<name>_scale_inv``);
- ``W[i, j] = e2m1(code[i, j]) * scale[i, j // 32]``.

Reading on the host lives here (and ``quantize``, which writes the format, for tests and tools): the loaders
dequantize FP4 experts to the compute dtype (``checkpoint/hf_dir.py``), or, with ``dtype="fp8"``, keep their codes
on the devices as ``quant/weights.py``'s ``Fp4Weight`` (``checkpoint/sharded_load.py``).
"""

from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np

E2M1 = ml_dtypes.float4_e2m1fn
GROUP = 32  # inputs per scale
PACKED_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))
SCALE_DTYPES = (np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.float32))
# The 16 e2m1 values by code (ml_dtypes keeps one code per byte, in the low nibble).
VALUES = np.arange(16, dtype=np.uint8).view(E2M1).astype(np.float32)


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a logical ``[out, in]`` FP4 weight."""
    out, inp = shape
    return out, -(-inp // GROUP)


def codes(packed: np.ndarray) -> np.ndarray:
    """``[..., n / 2]`` packed bytes -> ``[..., n]`` e2m1 codes, one per ``uint8`` (low nibble first)."""
    u = np.asarray(packed).view(np.uint8)
    return np.stack([u & 0xF, u >> 4], axis=-1).reshape(*u.shape[:-1], 2 * u.shape[-1])


def unpack(packed: np.ndarray) -> np.ndarray:
    """``[..., n / 2]`` packed bytes -> ``[..., n]`` fp32 e2m1 values."""
    return VALUES[codes(packed)]


def dequantize(packed: np.ndarray, scales: np.ndarray, rows: Optional[tuple[int, int]] = None,
               cols: Optional[tuple[int, int]] = None) -> np.ndarray:
    """fp32 ``W[r0:r1, c0:c1]`` of an FP4 weight (all of it by default) from the whole weight's packed bytes
    ``[out, in / 2]`` and scales ``[out, in / 32]`` (memory-mapped arrays: only the region's bytes are read)."""
    out, half = packed.shape
    inp = 2 * half
    if tuple(scales.shape) != scale_shape((out, inp)):
        raise ValueError(f"scale shape {list(scales.shape)} does not match the FP4 weight [{out}, {inp}] "
                         f"(stored [{out}, {half}], two values per byte): expected {list(scale_shape((out, inp)))}, "
                         f"one per row and {GROUP} inputs")
    r0, r1 = rows if rows is not None else (0, out)
    c0, c1 = cols if cols is not None else (0, inp)
    g0, g1 = c0 // GROUP, -(-c1 // GROUP)  # whole scale groups around the columns
    a0, a1 = g0 * GROUP, min(g1 * GROUP, inp)
    values = unpack(packed[r0:r1, a0 // 2: -(-a1 // 2)])[:, : a1 - a0]
    s = np.asarray(scales[r0:r1, g0:g1]).astype(np.float32)
    values = values * np.repeat(s, GROUP, axis=1)[:, : a1 - a0]
    return values[:, c0 - a0: c1 - a0]


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[out, in]`` -> (``int8`` packed ``[out, in / 2]``, ``float8_e8m0fnu`` scales ``[out, in / 32]``): each
    group's scale the power of two at or above ``amax / 6`` (6: e2m1's largest value), values rounded to the
    nearest e2m1. ``in`` must be a multiple of 32."""
    w = np.asarray(w, np.float32)
    out, inp = w.shape
    if inp % GROUP:
        raise ValueError(f"FP4 needs the input dim to be a multiple of {GROUP}; got [{out}, {inp}]")
    g = w.reshape(out, inp // GROUP, GROUP)
    amax = np.abs(g).max(-1)
    scales = np.where(amax > 0, np.exp2(np.ceil(np.log2(np.maximum(amax, np.finfo(np.float32).tiny) / 6.0))), 1.0)
    codes = (g / scales[..., None]).astype(E2M1).view(np.uint8).reshape(out, inp) & 0xF
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scales.astype(np.float32).astype(ml_dtypes.float8_e8m0fnu)
