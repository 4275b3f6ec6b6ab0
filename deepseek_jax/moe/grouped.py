"""Grouped SwiGLU experts: the expert GEMMs of the MoE over rows sorted by expert (pure functions).

``grouped_swiglu(recipe, x, order, group_sizes, wg, wu, wd, impl)`` computes, for sorted position j, the expert
MLP of group g(j) on row ``x[order[j]]``, where the first ``group_sizes[0]`` sorted positions belong to group 0,
the next ``group_sizes[1]`` to group 1, and so on; positions past ``sum(group_sizes)`` (and any ``order`` entry
outside ``x``) are padding and give 0. Implementations, all dropless and equal in values and gradients:

- ``ragged``: ``jax.lax.ragged_dot``, the TPU's grouped-GEMM kernel (XLA:CPU, and by report jaxlib 0.10's GPU
  backend, expand it into one dense matmul per group: use it on TPU only).
- ``blocked``: each group's rows are padded to a multiple of ``block_size`` and a scan runs one block per step
  with the block's one expert; blocks past the last real row are skipped (``lax.cond``), so the work follows the
  real rows, at most ``rows + groups * (block_size - 1)``, whatever the buffer's size. For GPU and CPU.
- ``gather``: each row gathers its own expert's weights (``[rows, D, I]``): for a step with fewer rows than
  experts (small-batch decode) this reads only the chosen experts, where the others read every expert once.
- ``dense``: every expert on every row, masked: a test reference.

Shapes: x ``[N, D]``; order ``[M]`` int32; group_sizes ``[G]`` int32; wg / wu ``[G, D, I]``, wd ``[G, I, D]``;
optional ``row_scale [M]``: sorted position j's result scaled by ``row_scale[j]`` (the expert-parallel MoE's
routing weights), applied to the ``[I]`` intermediate before the down projection. Returns ``[M, D]`` in the
recipe's output dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.layers.mlp import swiglu_act
from deepseek_jax.parallel.shard_map import vary, varying_axes

GROUPED_IMPLS = ("ragged", "blocked", "gather", "dense")


@jax.custom_vjp
def scale_rows(y: jax.Array, w: jax.Array) -> jax.Array:
    """``y [M, F] * w [M]`` in y's dtype: the weights cast to the activations' dtype, as DeepSeek's reference
    does. The MoE applies it to the ``[I]`` intermediate before the down projection (the reference scales the
    expert's ``[D]`` output after it: equal in exact arithmetic, not bit for bit in bf16), on one device and under
    expert parallelism alike. The gradient wrt ``w`` sums the row's products (formed in y's dtype) in fp32;
    neither pass converts ``y`` or its cotangent to fp32 (the TPU compiler kept such copies, 1.75 GiB each at
    V3's scale, when this was done in fp32 on the experts' outputs)."""
    return y * w.astype(y.dtype)[:, None]


def _scale_rows_fwd(y, w):
    return scale_rows(y, w), (y, w)


def _scale_rows_bwd(res, g):
    y, w = res
    dw = jnp.sum(g * y, axis=1, dtype=jnp.float32).astype(w.dtype)
    return scale_rows(g, w), dw


scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)


def _scaled(h: jax.Array, scale) -> jax.Array:
    """The intermediate ``h [M, ...]`` with row m scaled by ``scale[m]`` (unchanged for None)."""
    return h if scale is None else scale_rows(h.reshape(h.shape[0], -1), scale).reshape(h.shape)


def swiglu(recipe, x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, scale=None, limit=None) -> jax.Array:
    """One expert on rows x ``[M, D]`` with weights ``[D, I]``, ``[D, I]``, ``[I, D]`` (row m's result scaled by
    ``scale[m]``, if given; ``limit``: the SwiGLU clamp, ``layers/mlp.py``'s ``swiglu_act``)."""
    dims = (((1,), (0,)), ((), ()))
    h = swiglu_act(recipe.dot_general(x, wg, dims), recipe.dot_general(x, wu, dims), limit)
    return recipe.dot_general(_scaled(h, scale), wd, dims)


def default_block_size(num_rows: int, num_groups: int) -> int:
    """Rows per block: about the mean rows per group, a power of two in [8, 256]."""
    mean = max(num_rows // max(num_groups, 1), 1)
    return int(min(256, max(8, 1 << (mean.bit_length() - 1))))


def _group_of(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Group of each sorted position ``[m]`` (G for padding positions) and the groups' start positions."""
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(m, dtype=ends.dtype), side="right").astype(jnp.int32)
    return group, ends - group_sizes


def _take_rows(x: jax.Array, order: jax.Array, valid: jax.Array) -> jax.Array:
    """``x[order]`` with invalid positions (and any ``order`` outside ``x``) reading zeros: one gather that fills
    out-of-range rows, so no padded copy of ``x`` is made (for the MoE's received rows, the largest activation
    of a step); its transpose is a scatter-add."""
    n = x.shape[0]
    return jnp.take(x, jnp.where(valid & (order >= 0), order, n), axis=0, mode="fill", fill_value=0)


def grouped_swiglu(recipe, x, order, group_sizes, wg, wu, wd, impl: str = "blocked", block_size=None,
                   row_scale=None, limit=None):
    m, g = order.shape[0], wg.shape[0]
    group, starts = _group_of(group_sizes, m)
    valid = group < g
    if impl == "ragged":
        xs = _take_rows(x, order, valid)
        sizes = group_sizes.astype(jnp.int32)
        h = swiglu_act(recipe.ragged_dot(xs, wg, sizes), recipe.ragged_dot(xs, wu, sizes), limit)
        y = recipe.ragged_dot(_scaled(h, row_scale), wd, sizes)
        return jnp.where(valid[:, None], y, 0).astype(y.dtype)
    if impl == "gather":
        xs = _take_rows(x, order, valid)
        e = jnp.minimum(group, g - 1)
        dims = (((1,), (1,)), ((0,), (0,)))  # per row: [D] x [D, I]
        h = swiglu_act(recipe.dot_general(xs, wg[e], dims), recipe.dot_general(xs, wu[e], dims), limit)
        y = recipe.dot_general(_scaled(h, row_scale), wd[e], dims)
        return jnp.where(valid[:, None], y, 0).astype(y.dtype)
    if impl == "dense":
        xs = _take_rows(x, order, valid)
        dims = (((1,), (1,)), ((), ()))
        h = swiglu_act(recipe.dot_general(xs, wg, dims), recipe.dot_general(xs, wu, dims), limit)  # [M, G, I]
        y = recipe.dot_general(_scaled(h, row_scale), wd, (((2,), (1,)), ((1,), (0,))))  # [G, M, D]
        pick = jax.nn.one_hot(group, g, dtype=y.dtype)  # padding (group G) picks nothing
        return jnp.einsum("gmd,mg->md", y, pick)
    if impl != "blocked":
        raise ValueError(f"grouped GEMM impl {impl!r}: expected one of {GROUPED_IMPLS}")
    return _blocked(recipe, x, order, group_sizes, group, starts, valid, wg, wu, wd, block_size, row_scale, limit)


def _blocked(recipe, x, order, group_sizes, group, starts, valid, wg, wu, wd, block_size, row_scale, limit=None):
    m, g = order.shape[0], wg.shape[0]
    # Under shard_map, weights the rows do not vary with (replicated over the batch axes) are cast to vary here,
    # once: the cast's transpose (the psum of their gradient) then runs once after the loop, not per block.
    axes = varying_axes(x, order, group_sizes, wg, wu, wd)
    wg, wu, wd = (vary(w, axes) for w in (wg, wu, wd))
    b = block_size or default_block_size(m, g)
    padded = (group_sizes + b - 1) // b * b
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    n_blocks = (m + g * (b - 1)) // b
    # Buffer row r of the padded layout: its group, its offset in the group, whether it holds a real row.
    r = jnp.arange(n_blocks * b, dtype=jnp.int32)
    r_group = jnp.searchsorted(padded_ends, r, side="right").astype(jnp.int32)
    gi = jnp.minimum(r_group, g - 1)
    offset = r - padded_starts[gi]
    r_valid = (r_group < g) & (offset < group_sizes[gi])
    src = jnp.where(r_valid, starts[gi] + offset, m)  # sorted position held by buffer row r
    x_buf = _take_rows(x, jnp.concatenate([order, jnp.full((1,), x.shape[0], order.dtype)])[src], r_valid)
    block_group = gi[::b]
    block_live = r_group[::b] < g  # blocks past the last group's padded end are empty: skip them

    out_dtype = recipe.out_dtype

    # Each buffer row's scale (padding rows: 0), when there are scales.
    s_buf = None if row_scale is None else jnp.concatenate(
        [row_scale, jnp.zeros((1,), row_scale.dtype)])[jnp.where(r_valid, src, m)].reshape(n_blocks, b)

    # One block, rematerialized as a whole: the scan keeps only the block's own inputs (its rows, expert id, live
    # flag and scales) for the backward; the expert stacks are loop-invariant and stay out of the residuals.
    # The expert's slices are taken outside the ``cond``, which then reads and differentiates only them: the
    # backward of a slice adds a [D, I] gradient into the stacks' accumulators in place. (Slicing inside the
    # branch made the cond's residuals and cotangents the whole stacks: the scan kept [n_blocks, E, D, I]
    # copies of each and added an [E, D, I] gradient per block, which made the gradient of the 88M bench model
    # cost 24x its forward.)
    @jax.checkpoint
    def block(xb, e, live, sb):
        def run(ws):
            return swiglu(recipe, xb, *ws, sb, limit).astype(out_dtype)

        def skip(ws):
            return vary(jnp.zeros((b, x.shape[1]), out_dtype), varying_axes(xb, *ws))

        return jax.lax.cond(live, run, skip, (wg[e], wu[e], wd[e]))

    def one_block(_, inp):
        return None, block(*inp)

    _, y_buf = jax.lax.scan(one_block, None, (x_buf.reshape(n_blocks, b, -1), block_group, block_live, s_buf))
    # Back to sorted positions: position j sits at padded_starts[g] + (j - starts[g]) of the buffer.
    gj = jnp.minimum(group, g - 1)
    where = jnp.where(valid, padded_starts[gj] + jnp.arange(m, dtype=jnp.int32) - starts[gj], n_blocks * b)
    y_buf = jnp.concatenate([y_buf.reshape(n_blocks * b, -1), jnp.zeros((1, x.shape[1]), out_dtype)])
    return y_buf[where]
