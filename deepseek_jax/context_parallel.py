"""Context parallelism: long sequences split over the mesh's ``context`` axis, exchanging only MLA's latent.

- Every token-wise layer (norms, projections, MLP, MoE) runs on the device's own slice of each row: the rules
  map the activations' ``act_length`` onto ``context``.
- Attention keeps each device's queries where they are. Keys and values are made from MLA's compressed latent,
  ``c_kv`` and ``k_pe``: ``kv_lora_rank + qk_rope_head_dim`` values per token (576 for V3), which are
  all-gathered over ``context`` (one all-gather per layer, not a ring), then expanded by ``kv_b_proj`` on every
  device; per-head keys and values (V3: 128 heads x 320 values per token) never travel. Each device then runs
  the blockwise core with its queries against all the row's keys (``attend``, under ``jax.shard_map``).
- Causal balance (zig-zag): a row is cut into ``2C`` chunks and device i holds chunks i and ``2C-1-i``, so each
  device holds one early and one late chunk and does as much causal work as any other. The model puts the
  hidden states in that order after the embedding and back before the final norm (``zigzag_order``); attention
  masks by the tokens' original indices, so nothing else sees the order.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .attention import Layout, attention
from .sharding import dividing_axes, rule_axes


def current_mesh():
    """The mesh a step is traced under (``jax.set_mesh``), or None on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def context_size(length: Optional[int] = None) -> int:
    """How many ways the current mesh splits a sequence (1 without a mesh or a ``context`` axis); with
    ``length``, 1 unless it splits into ``2 x C`` equal chunks (zig-zag needs them)."""
    mesh = current_mesh()
    if mesh is None:
        return 1
    c = math.prod(mesh.shape[a] for a in rule_axes("act_length") if a in mesh.shape)
    if length is not None and length % (2 * c):
        return 1
    return c


def zigzag_order(t: int, c: int) -> np.ndarray:
    """The token order in which device i (of C) holds chunks i and 2C-1-i of a row of ``t`` tokens."""
    chunks = np.arange(t).reshape(2 * c, t // (2 * c))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * c - 1 - i]]) for i in range(c)])


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


def gather_latent(x: jax.Array) -> jax.Array:
    """``[B,T,...]`` -> the same, whole along T on every device (the all-gather of the latent)."""
    from .sharding import constrain

    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))


def permute(x: jax.Array, order: np.ndarray) -> jax.Array:
    """``x[:, order]`` for a ``[B,T,...]`` array."""
    return jnp.take(x, jnp.asarray(order), axis=1)
