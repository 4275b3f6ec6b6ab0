"""DeepSeek-V3's FP8 training recipe (docs/reference.md, section 7; V3 report section 3.3), emulated.

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
The tiles are ``quant/blocks.py``'s (dims that are not multiples of 128 end in partial tiles).

Every GEMM runs one 128-deep slice of K at a time: the slice's fp32 partial product of the E4M3 values gets both
operands' scales and is added to an fp32 accumulator as it is produced (the report's promotion of partial sums
to fp32 every 128 values, section 3.3.2), row chunk by row chunk, so no ``[K/128, M, N]`` (or even ``[M, N]``
fp32) temporary is ever built. Where the hardware has fp8 dots (CUDA compute capability >= 8.9) the
slices multiply the fp8 values directly; elsewhere they multiply exact bf16 (fp32 on CPU) copies of the same
E4M3 values; both give the same numbers up to fp32 summation order (the fp8-dot path is tested on CPU, where XLA
emulates fp8 dots; it has not yet run on a GPU). The routed experts go through the same recipe block by block
(``moe/grouped.py``'s blocked GEMM calls ``dot_general``); the ``ragged_dot`` path (TPU) quantizes the same way but
multiplies dequantized values: XLA exposes no grouped fp8 GEMM with per-block scales.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from deepseek_jax.ops import DimensionNumbers, contract_last
from deepseek_jax.quant.blocks import BLOCK, E4M3, dequantize_tiles, qdq, quantize_tiles


# ----- scaled GEMMs -------------------------------------------------------------------------------
def fp8_dots_supported(device) -> bool:
    """Whether ``device`` (a ``jax.Device``, or anything with its ``platform`` and, for CUDA, its
    ``compute_capability``) runs fp8 x fp8 dots on fp8 tensor cores: CUDA GPUs of compute capability >= 8.9
    (Ada, Hopper and later). TPUs up to v6e and CPUs have none; ROCm and unknown GPUs stay emulated."""
    if getattr(device, "platform", None) not in ("gpu", "cuda"):
        return False
    try:
        major, minor = (int(v) for v in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return (major, minor) >= (8, 9)


def has_fp8_dots() -> bool:
    """``fp8_dots_supported`` for the default device."""
    return fp8_dots_supported(jax.devices()[0])


# Rows per chunk of a scaled GEMM: the fp32 accumulator of one chunk is [chunk, N], so a GEMM's temporaries stay
# near ACCUMULATOR_BYTES however large M x N is (a V3 MLP GEMM of 8192 tokens would need 604 MB).
ACCUMULATOR_BYTES = 64 << 20


def _scaled_matmul(a_q, a_s, b_q, b_s, block_k: int, block_n: int, fp8_dots: bool, out_dtype) -> jax.Array:
    """``[M, K] x [K, N]`` of two quantized operands, in ``out_dtype``.

    ``a`` is tiled ``1 x block_k`` (scales ``[M, Kb]``), ``b`` is tiled ``block_k x block_n`` (scales ``[Kb, Nb]``).
    Each 128-deep slice of K gives an fp32 partial product of the raw E4M3 values, scaled by both operands'
    scales and added to an fp32 accumulator as it is produced (the V3 report's promotion to fp32 every 128
    values, section 3.3.2). Without fp8 dots the slices are multiplied as exact higher-precision copies of the
    same E4M3 values (bf16 holds every E4M3 value; fp32 on CPU, whose bf16 dots are slow), which gives the
    same numbers up to fp32 summation order. The output is produced in row chunks (a scan whose stacked
    outputs are the result, no copy), so the fp32 accumulator is ``[chunk, N]``, not ``[M, N]``: temporaries
    stay within ``ACCUMULATOR_BYTES`` plus the fp8 copies of the inputs.
    """
    (m, k), n = a_q.shape, b_q.shape[1]
    kb = a_s.shape[1]
    rows = max(1, min(m, ACCUMULATOR_BYTES // max(4 * n, 1)))
    chunks = -(-m // rows)
    rows = -(-m // chunks)
    pad_m = chunks * rows - m
    a4 = jnp.pad(a_q, ((0, pad_m), (0, kb * block_k - k))).reshape(chunks, rows, kb, block_k)
    s4 = jnp.pad(a_s, ((0, pad_m), (0, 0))).reshape(chunks, rows, kb)
    b3 = jnp.pad(b_q, ((0, kb * block_k - k), (0, 0))).reshape(kb, block_k, n)
    b_cols = jnp.repeat(b_s, block_n, axis=1)[:, :n]  # [Kb, N]: each column's scale per K slice
    dot_dtype = E4M3 if fp8_dots else (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    precision = jax.lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None

    def chunk(_, c):
        a_c, s_c = c  # [rows, Kb, block_k], [rows, Kb]

        def k_slice(acc, i):
            part = jax.lax.dot(a_c[:, i].astype(dot_dtype), b3[i].astype(dot_dtype), precision=precision,
                               preferred_element_type=jnp.float32)
            return acc + part * s_c[:, i, None] * b_cols[i][None, :], None

        acc, _ = jax.lax.scan(k_slice, jnp.zeros((rows, n), jnp.float32), jnp.arange(kb))
        return None, acc.astype(out_dtype)

    _, out = jax.lax.scan(chunk, None, (a4, s4))
    return out.reshape(chunks * rows, n)[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype, fp8_dots: bool = False) -> jax.Array:
    """``[M, K] x [K, N] -> [M, N]`` in ``out_dtype`` with the V3 recipe in forward, dgrad and wgrad.

    x is the activation (``1x128`` tiles), w the weight (``128x128`` blocks); see the module docstring.
    """
    return _fp8_matmul_fwd(x, w, out_dtype, fp8_dots)[0]


def _fp8_matmul_fwd(x, w, out_dtype, fp8_dots):
    x_q, x_s = quantize_tiles(x, (1, BLOCK))
    w_q, w_s = quantize_tiles(w, (BLOCK, BLOCK))
    y = _scaled_matmul(x_q, x_s, w_q, w_s, BLOCK, BLOCK, fp8_dots, out_dtype)
    # The backward pass keeps only fp8 copies (V3 section 3.3.3: activations are cached in fp8). Zero-size
    # arrays carry the input dtypes, which the cotangents must match.
    return y, (x_q, x_s, w_q, w_s, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_matmul_bwd(out_dtype, fp8_dots, res, dy):
    x_q, x_s, w_q, w_s, x_proto, w_proto = res
    # dgrad: dx = dy W^T, K = N; dy in 1x128 tiles along N, the forward's weight blocks transposed.
    dy_q, dy_s = quantize_tiles(dy, (1, BLOCK))
    dx = _scaled_matmul(dy_q, dy_s, w_q.T, w_s.T, BLOCK, BLOCK, fp8_dots, x_proto.dtype)
    # wgrad: dW = x^T dy, K = tokens; x (from its fp8 cache) and dy re-tiled 128x1 along the tokens.
    xt_q, xt_s = quantize_tiles(dequantize_tiles(x_q, x_s, (1, BLOCK)).T, (1, BLOCK))
    dyt_q, dyt_s = quantize_tiles(dy, (BLOCK, 1))
    dw = _scaled_matmul(xt_q, xt_s, dyt_q, dyt_s, BLOCK, 1, fp8_dots, w_proto.dtype)
    return dx, dw


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


# ----- the recipe behind the layers' dot_general hook - ---------------------------------------------
class Fp8Recipe:
    """The fp8 matmul recipe; same interface as ``layers/linear.py``'s ``MatmulRecipe``.

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

    def linear(self, x: jax.Array, kernel: jax.Array, n_in: int, axes=None) -> jax.Array:
        """``x @ kernel`` over x's last ``n_in`` dims (``layers/linear.py``'s ``MatmulRecipe.linear`` interface)."""
        return self.dot_general(x, kernel, contract_last(n_in, x.ndim))

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
