"""Attention under context parallelism: each device's queries (its slice of the sequence) against the whole row's
keys and values, under ``jax.shard_map`` (``parallel/context.py`` says how the sequence is split)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.attention.core import attention
from deepseek_jax.layers.attention.layout import Layout
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import dividing_axes, rule_axes


def attend(q, k, v, layout: Layout, scale: float, impl: str, block: int, platform: str):
    """Attention with queries split over the context axis and keys / values whole on every device.

    q ``[B,T,H,Dk]`` (T split over ``context``); k ``[B,S,H,Dk]``, v ``[B,S,H,Dv]`` and the keys' layout
    replicated over it (the caller all-gathers the latent and expands it). Batch and heads stay split as the
    rules put them.
    """
    mesh = current_mesh()
    sizes = mesh.shape
    b, _, h, _ = q.shape
    batch = dividing_axes("act_batch", b, mesh)
    heads = dividing_axes("heads", h, mesh)
    ctx = tuple(a for a in rule_axes("act_length") if sizes.get(a, 1) > 1)
    bt, ht, ct = (x or None for x in (batch, heads, ctx))
    q_spec, kv_spec = P(bt, ct, ht, None), P(bt, None, ht, None)
    lay_spec = Layout(P(bt, ct), P(bt, ct), P(bt, None), P(bt, None))

    def local(q, k, v, lay):
        return attention(q, k, v, lay, scale, impl, block, platform)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, lay_spec), out_specs=q_spec)(
        q, k, v, layout)
