"""Context parallelism: long sequences split over the mesh's ``context`` axis.

- Every token-wise layer (norms, projections, MLP, MoE) runs on the device's own slice of each row: the rules
  map the activations' ``act_length`` onto ``context``.
- Attention keeps each device's queries where they are and gathers the keys' source along the sequence: MLA
  all-gathers its compressed latent, ``c_kv`` and ``k_pe`` (``kv_lora_rank + qk_rope_head_dim`` values per token,
  576 for V3; one all-gather per layer, not a ring) and expands it on every device, so per-head keys and values
  (V3: 128 heads x 320 values per token) never travel. The attention itself runs under ``jax.shard_map``
  (``layers/attention/context_parallel.py``).
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

from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import constrain, rule_axes


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


def gather_sequence(x: jax.Array) -> jax.Array:
    """``[B,T,...]`` -> the same, whole along T on every device (the all-gather of MLA's latent, or of a dense
    student's keys and values)."""
    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))


def permute(x: jax.Array, order: np.ndarray) -> jax.Array:
    """``x[:, order]`` for a ``[B,T,...]`` array."""
    return jnp.take(x, jnp.asarray(order), axis=1)
