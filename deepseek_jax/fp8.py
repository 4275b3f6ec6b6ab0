"""DeepSeek-V3's FP8 training recipe (REFERENCE.md section 7; V3 report section 3.3), emulated.

Every GEMM of a recipe linear (forward ``y = x W``, dgrad ``dx = dy W^T``, wgrad ``dW = x^T dy``) reads its two
inputs as E4M3 (``float8_e4m3fn``, largest finite 448) with fine-grained scales taken from the online amax,
``scale = amax / 448`` (no delayed scaling), and accumulates in fp32.

Tiling convention: every operand is tiled along the dim that its GEMM contracts.
  * activation-like operands (x, dy): ``1 x 128`` tiles, one row (token) by 128 consecutive contracted values.
    In the forward pass and dgrad that is a token's 128 channels; in wgrad the contracted dim is the token dim,
    so x and dy are re-tiled ``128 x 1`` (128 tokens of one channel), as in the report (section 3.5.2: the
    cached ``1x128`` fp8 activation is dequantized, transposed and re-quantized into ``128x1`` tiles).
  * weights: ``128 x 128`` blocks of the 2-D ``[K, N]`` view of the kernel (contracted dims flattened into K,
    output dims into N, which is DeepSeek's ``[out, in]`` layout transposed). The same fp8 blocks serve the
    forward GEMM and, transposed, dgrad.
Dims that are not multiples of 128 end in partial tiles; an all-zero tile has scale 0 and dequantizes to 0.

Where the hardware has fp8 dots (CUDA compute capability >= 8.9) each GEMM multiplies the fp8 values directly,
one 128-deep slice of K at a time, and applies both scales to each fp32 partial product before summing
(the report's promotion of partial sums to fp32 every 128 values, section 3.3.2). Elsewhere the fp8 values are
dequantized and multiplied in fp32; both give the same numbers up to fp32 summation order. The experts' grouped
GEMM (``ragged_dot``) quantizes the same way but always multiplies dequantized values: XLA exposes no grouped
fp8 GEMM with per-block scales.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
BLOCK = 128  # tile / block edge of the V3 recipe

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


# ----- tile-wise quantization ---------------------------------------------------------------------
def _check_tiles(x: jax.Array, tile_shape: Sequence[int]) -> tuple[int, ...]:
    tile_shape = tuple(int(t) for t in tile_shape)
    if len(tile_shape) != x.ndim or any(t < 1 for t in tile_shape):
        raise ValueError(f"tile_shape {tile_shape} must give a positive tile size for each of the {x.ndim} dims "
                         f"of the array of shape {x.shape}")
    return tile_shape


def _tiled(x: jax.Array, tile_shape: tuple[int, ...]) -> jax.Array:
    """Zero-pad x to whole tiles and view it as ``[n_0, t_0, n_1, t_1, ...]``."""
    counts = [math.ceil(d / t) for d, t in zip(x.shape, tile_shape)]
    x = jnp.pad(x, [(0, n * t - d) for n, t, d in zip(counts, tile_shape, x.shape)])
    return x.reshape([v for n, t in zip(counts, tile_shape) for v in (n, t)])


def _untiled(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of ``_tiled``: merge ``[n_0, t_0, ...]`` back and drop the padding."""
    x = x.reshape([x.shape[2 * i] * x.shape[2 * i + 1] for i in range(len(shape))])
    return x[tuple(slice(0, d) for d in shape)]


def _expand(scales: jax.Array) -> jax.Array:
    """Scales ``[n_0, n_1, ...]`` -> ``[n_0, 1, n_1, 1, ...]``, to broadcast against a ``_tiled`` view."""
    return scales.reshape([v for n in scales.shape for v in (n, 1)])


def tile_scales(x: jax.Array, tile_shape: Sequence[int]) -> jax.Array:
    """fp32 ``amax / 448`` of each tile, shape ``[ceil(d_i / t_i) for each dim i]``."""
    tile_shape = _check_tiles(x, tile_shape)
    amax = jnp.abs(_tiled(x.astype(jnp.float32), tile_shape)).max(axis=tuple(range(1, 2 * x.ndim, 2)))
    return amax / E4M3_MAX


def quantize_with_scales(x: jax.Array, scales: jax.Array, tile_shape: Sequence[int]) -> jax.Array:
    """``x / scale`` per tile as E4M3, clipped to +-448 first (an out-of-range cast to e4m3fn gives NaN).

    A tile whose scale is 0 (all zeros) quantizes to zeros.
    """
    tile_shape = _check_tiles(x, tile_shape)
    safe = _expand(jnp.where(scales > 0, scales, 1.0))
    q = jnp.clip(_tiled(x.astype(jnp.float32), tile_shape) / safe, -E4M3_MAX, E4M3_MAX)
    return _untiled(q, x.shape).astype(E4M3)


def quantize_tiles(x: jax.Array, tile_shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """x -> (E4M3 values of x's shape, fp32 per-tile scales) with ``x ~= q * scale`` in every tile."""
    scales = tile_scales(x, tile_shape)
    return quantize_with_scales(x, scales, tile_shape), scales


def dequantize_tiles(q: jax.Array, scales: jax.Array, tile_shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """E4M3 values times their tile's scale, in ``dtype``."""
    tile_shape = _check_tiles(q, tile_shape)
    x = _tiled(q.astype(jnp.float32), tile_shape) * _expand(scales.astype(jnp.float32))
    return _untiled(x, q.shape).astype(dtype)


def qdq(x: jax.Array, tile_shape: Sequence[int], dtype=None) -> jax.Array:
    """Quantize-then-dequantize: the values an fp8 GEMM sees, in ``dtype`` (x's dtype by default)."""
    return dequantize_tiles(*quantize_tiles(x, tile_shape), tile_shape, x.dtype if dtype is None else dtype)


# ----- scaled GEMMs -------------------------------------------------------------------------------
def has_fp8_dots() -> bool:
    """True where XLA runs fp8 x fp8 dots on fp8 tensor cores: CUDA GPUs of compute capability >= 8.9."""
    if jax.default_backend() != "gpu":
        return False
    try:
        major, minor = (int(v) for v in str(jax.devices()[0].compute_capability).split(".")[:2])
    except (AttributeError, ValueError):  # ROCm or an unknown device kind: stay emulated
        return False
    return (major, minor) >= (8, 9)


def _scaled_matmul(a_q, a_s, b_q, b_s, block_k: int, block_n: int, fp8_dots: bool) -> jax.Array:
    """fp32 ``[M, K] x [K, N]`` of two quantized operands.

    ``a`` is tiled ``1 x block_k`` (scales ``[M, Kb]``), ``b`` is tiled ``block_k x block_n`` (scales ``[Kb, Nb]``).
    """
    if not fp8_dots:
        a = dequantize_tiles(a_q, a_s, (1, block_k))
        b = dequantize_tiles(b_q, b_s, (block_k, block_n))
        return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    (m, k), n = a_q.shape, b_q.shape[1]
    kb = a_s.shape[1]
    a3 = jnp.pad(a_q, ((0, 0), (0, kb * block_k - k))).reshape(m, kb, block_k)
    b3 = jnp.pad(b_q, ((0, kb * block_k - k), (0, 0))).reshape(kb, block_k, n)
    # One fp32 partial product per 128-deep slice of K, then both scales, then the sum over slices.
    partial = jax.lax.dot_general(a3, b3, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    b_cols = jnp.repeat(b_s, block_n, axis=1)[:, :n]  # [Kb, N]
    return (partial * a_s.T[:, :, None] * b_cols[:, None, :]).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype, fp8_dots: bool = False) -> jax.Array:
    """``[M, K] x [K, N] -> [M, N]`` in ``out_dtype`` with the V3 recipe in forward, dgrad and wgrad.

    x is the activation (``1x128`` tiles), w the weight (``128x128`` blocks); see the module docstring.
    """
    return _fp8_matmul_fwd(x, w, out_dtype, fp8_dots)[0]


def _fp8_matmul_fwd(x, w, out_dtype, fp8_dots):
    x_q, x_s = quantize_tiles(x, (1, BLOCK))
    w_q, w_s = quantize_tiles(w, (BLOCK, BLOCK))
    y = _scaled_matmul(x_q, x_s, w_q, w_s, BLOCK, BLOCK, fp8_dots).astype(out_dtype)
    # The backward pass keeps only fp8 copies (V3 section 3.3.3: activations are cached in fp8). Zero-size
    # arrays carry the input dtypes, which the cotangents must match.
    return y, (x_q, x_s, w_q, w_s, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_matmul_bwd(out_dtype, fp8_dots, res, dy):
    x_q, x_s, w_q, w_s, x_proto, w_proto = res
    # dgrad: dx = dy W^T, K = N; dy in 1x128 tiles along N, the forward's weight blocks transposed.
    dy_q, dy_s = quantize_tiles(dy, (1, BLOCK))
    dx = _scaled_matmul(dy_q, dy_s, w_q.T, w_s.T, BLOCK, BLOCK, fp8_dots)
    # wgrad: dW = x^T dy, K = tokens; x (from its fp8 cache) and dy re-tiled 128x1 along the tokens.
    xt_q, xt_s = quantize_tiles(dequantize_tiles(x_q, x_s, (1, BLOCK)).T, (1, BLOCK))
    dyt_q, dyt_s = quantize_tiles(dy, (BLOCK, 1))
    dw = _scaled_matmul(xt_q, xt_s, dyt_q, dyt_s, BLOCK, 1, fp8_dots)
    return dx.astype(x_proto.dtype), dw.astype(w_proto.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, out_dtype) -> jax.Array:
    """Grouped ``[M, K] x [G, K, N] -> [M, N]`` with quantized operands in forward and backward.

    x in ``1x128`` tiles, each group's weight in ``128x128`` blocks; the grouped GEMMs themselves run on the
    dequantized values in fp32 (no block-scaled grouped fp8 GEMM is reachable from XLA). In wgrad the
    ``128x1`` token tiles run over the expert-sorted rows and may straddle two experts' segments.
    """
    return _fp8_ragged_fwd(x, w, group_sizes, out_dtype)[0]


def _ragged(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)


def _fp8_ragged_fwd(x, w, group_sizes, out_dtype):
    x_q, x_s = quantize_tiles(x, (1, BLOCK))
    w_q, w_s = quantize_tiles(w, (1, BLOCK, BLOCK))
    x_dq = dequantize_tiles(x_q, x_s, (1, BLOCK))
    w_dq = dequantize_tiles(w_q, w_s, (1, BLOCK, BLOCK))
    y = _ragged(x_dq, w_dq, group_sizes).astype(out_dtype)
    return y, (x_q, x_s, w_q, w_s, group_sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_ragged_bwd(out_dtype, res, dy):
    x_q, x_s, w_q, w_s, group_sizes, x_proto, w_proto = res
    w_dq = dequantize_tiles(w_q, w_s, (1, BLOCK, BLOCK))
    dx = _ragged(qdq(dy, (1, BLOCK), jnp.float32), jnp.swapaxes(w_dq, 1, 2), group_sizes)
    x_t = qdq(dequantize_tiles(x_q, x_s, (1, BLOCK)), (BLOCK, 1))  # re-tiled 128x1 along the rows
    _, transpose = jax.vjp(lambda w_: _ragged(x_t, w_, group_sizes), w_dq)
    (dw,) = transpose(qdq(dy, (BLOCK, 1), jnp.float32))
    # group_sizes is an integer input: its cotangent is float0.
    dgs = jnp.zeros(group_sizes.shape, jax.dtypes.float0)
    return dx.astype(x_proto.dtype), dw.astype(w_proto.dtype), dgs


fp8_ragged_dot.defvjp(_fp8_ragged_fwd, _fp8_ragged_bwd)


# ----- the recipe behind linear.py's dot_general hook ---------------------------------------------
class Fp8Recipe:
    """The fp8 matmul recipe; same interface as ``linear.MatmulRecipe``.

    ``lhs`` is read as the activation and ``rhs`` as the weight. Any ``dot_general`` is brought to
    ``[B, M, K] x [B, K, N]`` (batch dims B, free dims of lhs flattened into M, contracted dims into K, free dims
    of rhs into N) and each of the B products runs ``fp8_matmul``. ``use_fp8_dots`` None picks real fp8 dots
    where the hardware has them (``has_fp8_dots``).

    The compute dtype is the output dtype; the inputs are quantized from the precision they arrive in (the
    fp32 master weights, activations in the compute dtype), and their gradients come back in that precision.
    """

    def __init__(self, dtype, out_dtype=None, use_fp8_dots: Optional[bool] = None):
        self.dtype = jnp.dtype(dtype)
        self.out_dtype = self.dtype if out_dtype is None else jnp.dtype(out_dtype)
        self.fp8_dots = has_fp8_dots() if use_fp8_dots is None else bool(use_fp8_dots)

    def dot_general(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers) -> jax.Array:
        (lc, rc), (lb, rb) = (tuple(map(tuple, d)) for d in dimension_numbers)
        lf = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
        rf = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
        if [lhs.shape[d] for d in lc + lb] != [rhs.shape[d] for d in rc + rb]:
            raise ValueError(f"fp8 dot_general: contracting/batch dims {lc}, {lb} of lhs {lhs.shape} do not match "
                             f"dims {rc}, {rb} of rhs {rhs.shape}")
        batch = tuple(lhs.shape[d] for d in lb)
        m_dims, n_dims = tuple(lhs.shape[d] for d in lf), tuple(rhs.shape[d] for d in rf)
        k = math.prod(lhs.shape[d] for d in lc)
        x = jnp.transpose(lhs, lb + lf + lc).reshape(batch + (math.prod(m_dims), k))
        w = jnp.transpose(rhs, rb + rc + rf).reshape(batch + (k, math.prod(n_dims)))

        def matmul(x2, w2):
            return fp8_matmul(x2, w2, self.out_dtype, self.fp8_dots)

        for _ in batch:
            matmul = jax.vmap(matmul)
        return matmul(x, w).reshape(batch + m_dims + n_dims)

    def ragged_dot(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Grouped matmul ``[M, K] x [G, K, N] -> [M, N]``, rows of ``lhs`` grouped by ``group_sizes``."""
        return fp8_ragged_dot(lhs, rhs, group_sizes, self.out_dtype)
