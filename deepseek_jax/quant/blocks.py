"""FP8 block quantization: e4m3 values and one fp32 scale per tile, ``x ~= q * scale`` in every tile.

The one quantizer behind every FP8 array of the library:
- DeepSeek's FP8 releases (``docs/reference.md``, section 4): 128x128 blocks of each ``[out, in]`` weight, the
  scale stored as ``weight_scale_inv``; read by the loaders, written by ``export --fp8``, kept on the devices
  by ``quant/weights.py``;
- the FP8 training recipe (section 7; ``quant/recipe.py``): 1x128 activation tiles, 128x128 weight blocks;
- the FP8 KV cache (``layers/kv_cache.py``): one scale per cached vector.

A tile's scale is ``amax / 448`` (448: e4m3's largest finite value), or 1 for an all-zero tile (the releases'
convention; its values are 0 whatever the scale); ``power_of_two`` rounds it up to a power of two (the
``ue8m0`` scale format of V3.1 / V3.2). Values are clipped to +-448 before the cast: e4m3fn has no infinity,
and an out-of-range cast gives NaN. Dims that are not multiples of the tile end in partial tiles.

The functions take numpy arrays (the converter, on the host) or jax arrays (everything on the devices) and
compute with the array's own module, so the host and the devices quantize with the same code.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn  # the same type as jnp.float8_e4m3fn
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)  # 448
BLOCK = 128  # the edge of DeepSeek's weight blocks and of the recipe's activation tiles


def _np(x) -> bool:
    return isinstance(x, np.ndarray)


def _xp(x):
    """numpy for host arrays, jax.numpy for everything else (device arrays, tracers)."""
    return np if _np(x) else jnp


def _check_tiles(x, tile_shape: Sequence[int]) -> tuple[int, ...]:
    tile_shape = tuple(int(t) for t in tile_shape)
    if len(tile_shape) != x.ndim or any(t < 1 for t in tile_shape):
        raise ValueError(f"tile_shape {tile_shape} must give a positive tile size for each of the {x.ndim} dims "
                         f"of the array of shape {tuple(x.shape)}")
    return tile_shape


def _tiled(x, tile_shape: tuple[int, ...]):
    """Zero-pad x to whole tiles and view it as ``[n_0, t_0, n_1, t_1, ...]``."""
    counts = [math.ceil(d / t) for d, t in zip(x.shape, tile_shape)]
    pad = [(0, n * t - d) for n, t, d in zip(counts, tile_shape, x.shape)]
    if any(p for _, p in pad):
        x = _xp(x).pad(x, pad)
    return x.reshape([v for n, t in zip(counts, tile_shape) for v in (n, t)])


def _untiled(x, shape: tuple[int, ...]):
    """Inverse of ``_tiled``: merge ``[n_0, t_0, ...]`` back and drop the padding."""
    x = x.reshape([x.shape[2 * i] * x.shape[2 * i + 1] for i in range(len(shape))])
    return x[tuple(slice(0, d) for d in shape)]


def _expand(scales):
    """Scales ``[n_0, n_1, ...]`` -> ``[n_0, 1, n_1, 1, ...]``, to broadcast against a ``_tiled`` view."""
    return scales.reshape([v for n in scales.shape for v in (n, 1)])


def tile_scales(x, tile_shape: Sequence[int], power_of_two: bool = False):
    """fp32 ``amax / 448`` of each tile (1 for an all-zero tile), shape ``[ceil(d_i / t_i) for each dim i]``."""
    xp, tile_shape = _xp(x), _check_tiles(x, tile_shape)
    # The max of |x| is exact in x's own dtype: reduce first, then widen (no fp32 copy of a weight is built).
    amax = xp.abs(_tiled(x, tile_shape)).max(axis=tuple(range(1, 2 * x.ndim, 2))).astype(np.float32)
    scales = xp.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0))
    if power_of_two:
        scales = xp.exp2(xp.ceil(xp.log2(scales)))
    return scales.astype(np.float32)


def quantize_with_scales(x, scales, tile_shape: Sequence[int]):
    """``x / scale`` per tile as e4m3, clipped to +-448 first."""
    xp, tile_shape = _xp(x), _check_tiles(x, tile_shape)
    q = xp.clip(_tiled(x.astype(np.float32), tile_shape) / _expand(scales.astype(np.float32)), -E4M3_MAX, E4M3_MAX)
    return _untiled(q, tuple(x.shape)).astype(E4M3)


def quantize_tiles(x, tile_shape: Sequence[int], power_of_two: bool = False):
    """x -> (e4m3 values of x's shape, fp32 per-tile scales) with ``x ~= q * scale`` in every tile."""
    scales = tile_scales(x, tile_shape, power_of_two)
    return quantize_with_scales(x, scales, tile_shape), scales


def dequantize_tiles(q, scales, tile_shape: Sequence[int], dtype=np.float32):
    """e4m3 values times their tile's scale, in ``dtype`` (the product in fp32)."""
    tile_shape = _check_tiles(q, tile_shape)
    x = _tiled(q.astype(np.float32), tile_shape) * _expand(scales.astype(np.float32))
    return _untiled(x, tuple(q.shape)).astype(dtype)


def qdq(x, tile_shape: Sequence[int], dtype=None):
    """Quantize-then-dequantize: the values an fp8 GEMM sees, in ``dtype`` (x's dtype by default)."""
    return dequantize_tiles(*quantize_tiles(x, tile_shape), tile_shape, x.dtype if dtype is None else dtype)


def block_grid(shape: Sequence[int], block: int = BLOCK) -> tuple[int, ...]:
    """The scale grid of a weight of ``shape`` in ``block x block`` blocks (edge blocks partial)."""
    return tuple(math.ceil(d / block) for d in shape)


def dequantize_region(q8: np.ndarray, scales: np.ndarray, origin: tuple[int, int] = (0, 0),
                      full_shape: Optional[tuple[int, int]] = None, block: int = BLOCK) -> np.ndarray:
    """fp32 values of the rows and columns ``q8`` of a block-quantized 2-D weight of ``full_shape`` that start at
    row, column ``origin`` (the region one device's shard needs); ``scales`` is the whole weight's block grid.
    ``W[i, j] = q8[i, j] * scales[i // block, j // block]``."""
    rows, cols = q8.shape
    full = tuple(full_shape) if full_shape is not None else (rows, cols)
    if tuple(scales.shape) != block_grid(full, block):
        raise ValueError(f"scale_inv shape {tuple(scales.shape)} does not match weight {full}: "
                         f"expected {block_grid(full, block)} for {block}x{block} blocks")
    # Pad the region in front to its first block's edge, so that it is whole blocks of the scale grid.
    (r0, c0), (pr, pc) = origin, (origin[0] % block, origin[1] % block)
    s = np.asarray(scales[r0 // block: (r0 + rows - 1) // block + 1, c0 // block: (c0 + cols - 1) // block + 1])
    aligned = np.pad(np.asarray(q8).astype(np.float32), ((pr, 0), (pc, 0)))
    return dequantize_tiles(aligned, s, (block, block))[pr:, pc:]


def is_power_of_two(scales) -> bool:
    """True when every scale is an exact power of two (a ``ue8m0`` checkpoint)."""
    m, _ = np.frexp(np.asarray(scales, np.float32))
    return bool(np.all(m == 0.5))
