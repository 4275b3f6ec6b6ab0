"""The one place that maps logical axis names onto the device mesh ``(data, fsdp, expert, context, tensor)``.

Layers name their weights (``embed``, ``heads``, ``expert``...) and activations (``act_batch``...); nothing else
names mesh axes. ``LOGICAL_RULES`` says where each name goes; ``param_shardings`` turns a params tree's names
and shapes into ``NamedSharding``s.

Weights are FSDP-sharded over the whole mesh: the expert stacks put their expert dim on ``expert`` (so expert
weights never cross that axis) and their model dim on ``fsdp x context``; every other weight puts its first
shardable dim (``embed``, ``vocab``, ``q_lora``, ``kv_lora``, the MLP width) on ``fsdp x expert x context``
(``x data`` with ``logical_rules(fsdp_over_data=True)``, ZeRO-3 style), and heads / MLP widths on ``tensor``.
Activations split the batch over ``data x fsdp x expert`` and the sequence over ``context``. A weight's dims take
axes in order and an axis is used once per weight, so each weight ends up split over every axis that divides it.
A dim that its axes' product does not divide is sharded over the largest product of them that does (with a
warning), not silently replicated.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp", "expert")  # the global batch is split over these
CONTEXT_AXES = ("context",)  # the sequence (context parallelism, ``parallel/context.py``)
FSDP_AXES = ("fsdp", "expert", "context")  # non-expert weights: FSDP over these (and data, when asked)


def logical_rules(fsdp_over_data: bool = False) -> tuple[tuple[str, Any], ...]:
    """Logical name -> mesh axes (or None: replicated), in the order a dim tries them."""
    fsdp = (("data",) if fsdp_over_data else ()) + FSDP_AXES
    return (
        ("act_batch", BATCH_AXES),
        ("act_length", CONTEXT_AXES),
        ("act_embed", None),
        ("layers", None),
        ("expert", "expert"),
        ("embed", fsdp),
        ("vocab", ("tensor",) + fsdp),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # a dense student's key/value heads (GQA)
        ("mlp", ("tensor",) + fsdp),
        ("moe_mlp", "tensor"),
        ("q_lora", fsdp),
        ("kv_lora", fsdp),
        ("qk_head", None),
        ("kv_head", None),
        ("v_head", None),
        ("mtp_concat", fsdp),
    )


LOGICAL_RULES = logical_rules()
_WARNED: set = set()


def largest_dividing(axes: tuple[str, ...], dim: int, mesh) -> tuple[str, ...]:
    """The sub-tuple of ``axes`` (order kept) with the largest product of sizes that divides ``dim``."""
    best: tuple[str, ...] = ()
    for r in range(len(axes), 0, -1):
        for sub in itertools.combinations(axes, r):
            size = math.prod(mesh.shape[a] for a in sub)
            if dim % size == 0 and size > math.prod(mesh.shape[a] for a in best):
                best = sub
    return best


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry (or rule value): None, an axis name, or a tuple of them."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def spec_entry(axes: Sequence[str]):
    """The ``PartitionSpec`` entry for ``axes``: None, the one axis, or the tuple."""
    axes = tuple(axes)
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def current_rules():
    """The logical axis rules in effect (``nn.logical_axis_rules``), else ``LOGICAL_RULES``."""
    return nn.get_logical_axis_rules() or LOGICAL_RULES


def rule_axes(name: str) -> tuple[str, ...]:
    """The mesh axes the logical ``name`` maps to under the rules in effect (``current_rules``)."""
    return entry_axes(dict(current_rules()).get(name))


def dividing_axes(name: str, dim: int, mesh) -> tuple[str, ...]:
    """The axes of logical ``name`` (those of size > 1 in ``mesh``) with the largest product dividing ``dim``."""
    return largest_dividing(tuple(a for a in rule_axes(name) if mesh.shape.get(a, 1) > 1), dim, mesh)


def token_split(mesh, batch: int, length: Optional[int] = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(batch axes, length axes)``: how ``batch x length`` tokens are split, as the activations are: the
    ``act_batch`` axes that divide the batch, and the ``act_length`` (context) axes where they divide the
    sequence (else none)."""
    ctx = tuple(a for a in rule_axes("act_length") if mesh.shape.get(a, 1) > 1)
    if length is None or not ctx or length % math.prod(mesh.shape[a] for a in ctx):
        ctx = ()
    return dividing_axes("act_batch", batch, mesh), ctx


def token_axes(mesh, batch: int, length: Optional[int] = None) -> tuple[str, ...]:
    """The mesh axes ``batch x length`` tokens are split over, in order (``token_split``'s two, joined)."""
    split, ctx = token_split(mesh, batch, length)
    return split + ctx


def mesh_axes_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh, rules) -> PartitionSpec:
    rule = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = rule.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = tuple(a for a in entry_axes(axes) if a not in used and mesh.shape.get(a, 1) > 1)
        chosen = largest_dividing(axes, dim, mesh)
        if chosen != axes and not name.startswith("act_") and (name, dim, axes) not in _WARNED:
            _WARNED.add((name, dim, axes))
            ways = math.prod(mesh.shape[a] for a in chosen)
            warnings.warn(f"logical axis {name!r} of size {dim} does not divide over {axes} "
                          f"({math.prod(mesh.shape[a] for a in axes)} ways); sharded over {chosen or 'nothing'} "
                          f"({ways} ways)", stacklevel=3)
        if not chosen:
            out.append(None)
            continue
        used.update(chosen)
        out.append(spec_entry(chosen))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """``x`` constrained to the sharding its logical ``names`` get under the mesh and rules in effect (a dim its
    axes do not divide takes the largest product that does); unchanged outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_axes_for(names, x.shape, mesh, current_rules()))


def logical_sharding(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES):
    """A ``NamedSharding`` for one array from its logical axis names and shape."""
    return NamedSharding(mesh, mesh_axes_for(names, shape, mesh, rules))


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for a params tree, from ``jax.eval_shape(model.init, ...)["params"]`` (boxed, with names)."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    shapes = nn.meta.unbox(boxed_abstract_params)
    return jax.tree.map(
        lambda spec, x: logical_sharding(tuple(spec), x.shape, mesh, rules),
        specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major ``[B, T, ...]`` arrays: dim 0 over the batch axes, dim 1 over the context axis (context
    parallelism), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    ctx = tuple(a for a in CONTEXT_AXES if mesh.shape.get(a, 1) > 1)
    rest = [ctx or None] + [None] * (ndim - 2) if ndim >= 2 else []
    return NamedSharding(mesh, PartitionSpec(axes if axes else None, *rest))


def process_rows(mesh: Mesh, batch: int, length: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``[batch, length]`` global batch (``batch_sharding``) that this process's
    devices hold, whole or in part. With the context (or tensor) axis spanning processes, several processes hold
    the same rows (each a slice of their tokens, or a replica); ``Trainer.put_batch`` takes them whole and places
    each device's part. Raises if they are not one contiguous range (a mesh whose device order interleaves the
    processes along the batch)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((batch, length))
    spans = sorted({(rows.start or 0, batch if rows.stop is None else rows.stop) for rows, *_ in index.values()})
    start, stop = spans[0]
    for lo, hi in spans[1:]:
        if lo > stop:
            raise ValueError(f"process {jax.process_index()}'s devices hold rows {spans} of the global batch of "
                             f"{batch}: not one contiguous range; build the mesh with each process's devices "
                             "together along the batch axes")
        stop = max(stop, hi)
    return start, stop


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


