"""Helpers for code that runs under ``jax.shard_map``: which manual mesh axes a value varies over, and casts that
make values vary (or sums that make them invariant) as the body's results need."""

from __future__ import annotations

import jax


def varying_axes(*arrays) -> set:
    """The manual mesh axes (inside ``shard_map``) over which any of ``arrays`` varies; empty outside it."""
    axes = set()
    for a in jax.tree.leaves(arrays):  # pytrees too (an FP8-kept expert stack: its values and scales)
        aval = jax.typeof(a)
        manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier and later releases: aval.vma
        axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()) or ())
    return axes


def vary(x, axes: set):
    """``x`` (an array or a pytree of them) marked as varying over ``axes`` too (a no-op outside ``shard_map``)."""

    def one(a):
        missing = tuple(sorted(axes - varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(one, x)


def sum_to_vma(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Under ``shard_map``, the cotangent of an input that is the same on every device of an axis (keys and values
    whole on each context shard) is the sum of each device's part over that axis."""
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal)))
    return jax.lax.psum(grad, extra) if extra else grad
