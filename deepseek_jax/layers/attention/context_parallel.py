"""Attention under context parallelism: each device's queries (its slice of the sequence) against the whole row's
keys and values, under ``jax.shard_map`` (``parallel/context.py`` says how the sequence is split)."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.attention.core import attention
from deepseek_jax.layers.attention.layout import Layout
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import dividing_axes, rule_axes


def _split(q, mesh):
    """The mesh axes (or None) that split queries ``[B,T,H,...]``'s batch, heads and sequence."""
    b, _, h = q.shape[:3]
    ctx = tuple(a for a in rule_axes("act_length") if mesh.shape.get(a, 1) > 1)
    return tuple(x or None for x in (dividing_axes("act_batch", b, mesh), dividing_axes("heads", h, mesh), ctx))


def attend(q, k, v, layout: Layout, scale: float, impl: str, block: int, platform: str):
    """Attention with queries split over the context axis and keys / values whole on every device.

    q ``[B,T,H,Dk]`` (T split over ``context``); k ``[B,S,H,Dk]``, v ``[B,S,H,Dv]`` and the keys' layout
    replicated over it (the caller all-gathers the latent and expands it). Batch and heads stay split as the
    rules put them.
    """
    mesh = current_mesh()
    bt, ht, ct = _split(q, mesh)
    q_spec, kv_spec = P(bt, ct, ht, None), P(bt, None, ht, None)
    lay_spec = Layout(P(bt, ct), P(bt, ct), P(bt, None), P(bt, None))

    def local(q, k, v, lay):
        return attention(q, k, v, lay, scale, impl, block, platform)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, lay_spec), out_specs=q_spec)(
        q, k, v, layout)


def sparse_attend(core, q, kv, qi, ki, wi, layout: Layout):
    """DeepSeek-V3.2's sparse attention (``sparse.sparse_core``, bound to its sizes as ``core``) with queries split
    over the context axis: each device's queries pick their top-k among the whole row's keys and attend to those.

    q ``[B,T,H,R+P]``, the indexer's qi ``[B,T,Hi,Di]`` and wi ``[B,T,Hi]`` split along T; the latent rows
    kv (``[B,S,...]`` arrays in any pytree ``sparse_core`` takes), the indexer keys ki (the same) and the keys'
    layout whole on every device (gathered by the caller). MLA's heads stay split as the rules put them; the
    indexer's heads are summed into one score, so every head shard selects for its queries (the same choice).
    The sparse stage's head-summed probabilities are summed over the head shards.
    """
    mesh = current_mesh()
    bt, ht, ct = _split(q, mesh)
    per_query = P(bt, ct, None)
    whole = lambda tree: jax.tree.map(lambda x: P(bt, *(None,) * (x.ndim - 1)), tree)  # noqa: E731
    in_specs = (P(bt, ct, ht, None), whole(kv), P(bt, ct, None, None), whole(ki), per_query,
                Layout(P(bt, ct), P(bt, ct), P(bt, None), P(bt, None)))

    def local(q, kv, qi, ki, wi, lay):
        out, kl, chosen = core(q, kv, qi, ki, wi, lay)
        if kl is not None and ht:
            logits, probs, valid = kl
            kl = (logits, jax.lax.psum(probs, ht), valid)
        return out, kl, chosen

    probe = jax.eval_shape(core, q, kv, qi, ki, wi, layout)[1]
    out_specs = (P(bt, ct, ht, None), None if probe is None else (per_query,) * 3, per_query)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(q, kv, qi, ki, wi, layout)
