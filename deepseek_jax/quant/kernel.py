"""A matmul on FP8-kept weights (``quant/weights.py``'s ``Fp8Weight``) that dequantizes per 128x128 block inside the
kernel.

``x [M, K] @ W [K, N]`` with ``W[i, j] = q[i, j] * scale[i // 128, j // 128]``: a Pallas TPU kernel walks the output
in ``[bm, bn]`` tiles and K in steps of ``bk``; each step reads ``bk x bn`` e4m3 values from HBM, and for each of
its ``bk / 128`` block rows multiplies them by their scales in fp32 (the same products as
``Fp8Weight.dequantize``), casts to the compute dtype and accumulates the tile's dot into an fp32 VMEM
accumulator. The dequantized weight never exists in HBM: the kernel's HBM traffic is one byte per weight, and its
only temporary outside VMEM is the scales repeated along N (``K / 128 x N`` fp32, 1/32 of the e4m3 bytes),
because the TPU's block shapes need 8-row by 128-column tiles of every operand.

Sharding: under a mesh the linear layer passes the mesh axes of x's rows and of the weight's K and N (from the
logical rules, block-aligned as the weight is placed) and every device runs the kernel on its own shards
(``jax.shard_map``; ``custom_partitioning`` would leave the layout to the partitioner, but the TPU compiler that
``deepseek-jax plan`` drives from a CPU host cannot run its Python callback). The weight keeps its sharding; rows
of x keep theirs; where the weight is split along K (and x's rows are not split over the same mesh axes) the
per-device products are partial sums, added by a ``psum`` in fp32; where x's rows and the weight's K are split
over the same axes the weight is all-gathered along K (FSDP's gather).

The backward (for a gradient with respect to x) is the XLA dequantized matmul; the FP8 values get no gradient.

Where it runs: ``ModelOptions.fp8_weight_matmul`` ("auto": on TPU; "pallas": everywhere, off TPU in Pallas'
interpreter, for tests; "xla": never). It needs K and N multiples of 128 (else the XLA path); x's rows are padded
to the row tile.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from deepseek_jax.parallel.rules import entry_axes, spec_entry
from deepseek_jax.quant.blocks import BLOCK
from deepseek_jax.quant.weights import Fp8Weight

MAX_BK = 8192  # the largest K one step reads when K is no multiple of 1024


def block_sizes(m: int, k: int, n: int) -> Optional[tuple[int, int, int]]:
    """``(bm, bk, bn)`` for an ``[m, k] x [k, n]`` product, or None where the kernel does not apply.

    bk: 1024 (8 block rows: the scales' tile needs 8 rows) where K allows, else all of K; bn: 512, 256 or 128;
    bm: 256, or m rounded up to 16 rows (bf16's sublane tile) for small m (decode)."""
    if k % BLOCK or n % BLOCK or k < BLOCK or n < BLOCK:
        return None
    bk = 1024 if k % 1024 == 0 else k
    if bk > MAX_BK:
        return None
    bn = next(b for b in (512, 256, 128) if n % b == 0)
    bm = 256 if m >= 256 else -(-m // 16) * 16
    return bm, bk, bn


def _kernel(x_ref, q_ref, s_ref, o_ref, acc_ref, *, compute_dtype):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for a in range(q_ref.shape[0] // BLOCK):
        rows = slice(a * BLOCK, (a + 1) * BLOCK)
        w = (q_ref[rows, :].astype(jnp.float32) * s_ref[a:a + 1, :]).astype(compute_dtype)
        acc_ref[...] += jnp.dot(x_ref[:, rows].astype(compute_dtype), w, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def local_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, compute_dtype, out_dtype,
                 interpret: bool = False) -> jax.Array:
    """The kernel on one device's arrays: ``x [M, K]``, ``q [K, N]`` e4m3, ``scale [K / 128, N / 128]``."""
    from jax.experimental.pallas import tpu as pltpu

    (m, k), n = x.shape, q.shape[1]
    sizes = block_sizes(m, k, n)
    if sizes is None:
        raise ValueError(f"fp8 kernel: [{m}, {k}] x [{k}, {n}] needs K and N multiples of {BLOCK}")
    bm, bk, bn = sizes
    rows = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    s_rows = jnp.repeat(scale.astype(jnp.float32), BLOCK, axis=1)  # [K / 128, N]
    out = pl.pallas_call(
        functools.partial(_kernel, compute_dtype=jnp.dtype(compute_dtype)),
        grid=(rows // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                  pl.BlockSpec((bk // BLOCK, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(xp, q, s_rows)
    return out[:m] if rows != m else out


def layout(x_rows, w_k, w_n) -> tuple:
    """Per-device layout of ``x [M, K] @ W [K, N]`` from the mesh axes x's rows and W's K and N are split over:
    ``(x spec, W spec, output spec, the axes the partial products are summed over)``. The weight keeps its
    sharding (it is the large operand); x's rows keep theirs except axes W's N uses (the output cannot split
    over one axis twice); K stays split where W's is unless x's rows use that axis too: then W is gathered along K
    (FSDP's gather) instead of x's rows."""
    from jax.sharding import PartitionSpec

    n_axes = entry_axes(w_n)
    m_axes = tuple(a for a in entry_axes(x_rows) if a not in n_axes)
    k_axes = tuple(a for a in entry_axes(w_k) if a not in m_axes and a not in n_axes)
    m, k, n = spec_entry(m_axes), spec_entry(k_axes), spec_entry(n_axes)
    return PartitionSpec(m, k), PartitionSpec(k, n), PartitionSpec(m, n), k_axes


def _sharded(x, q, scale, compute_dtype, out_dtype, interpret, mesh, specs):
    if mesh is None:
        return local_matmul(x, q, scale, compute_dtype, out_dtype, interpret)
    x_spec, w_spec, out_spec, k_axes = layout(*specs)

    def lower(x, q, scale):
        if not k_axes:
            return local_matmul(x, q, scale, compute_dtype, out_dtype, interpret)
        partial = local_matmul(x, q, scale, compute_dtype, jnp.float32, interpret)
        return jax.lax.psum(partial, k_axes).astype(out_dtype)

    # check_vma off: a Pallas call cannot declare how its outputs vary (they vary as its inputs do).
    return jax.shard_map(lower, mesh=mesh, in_specs=(x_spec, w_spec, w_spec), out_specs=out_spec,
                         check_vma=False)(x, q, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def fp8_weight_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, compute_dtype, out_dtype, interpret: bool = False,
               mesh=None, specs: tuple = (None, None, None)):
    """``x [M, K] @ dequantize(q, scale) [K, N]`` by the kernel (see the module docstring), output ``out_dtype``.

    Under a mesh, ``specs`` are the mesh axes of x's rows, W's K and W's N (``layout``): each device runs the
    kernel on its shards (``jax.shard_map``), partial sums over K added in fp32."""
    return _sharded(x, q, scale, jnp.dtype(compute_dtype), jnp.dtype(out_dtype), bool(interpret), mesh, specs)


def _fwd(x, q, scale, compute_dtype, out_dtype, interpret, mesh, specs):
    return fp8_weight_matmul(x, q, scale, compute_dtype, out_dtype, interpret, mesh, specs), (x, q, scale)


def _bwd(compute_dtype, out_dtype, interpret, mesh, specs, res, g):
    x, q, scale = res
    w = Fp8Weight(q, scale, 1, 1).dequantize(compute_dtype)
    dx = jax.lax.dot_general(g.astype(compute_dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), jnp.zeros_like(q), jnp.zeros_like(scale)


fp8_weight_matmul.defvjp(_fwd, _bwd)
