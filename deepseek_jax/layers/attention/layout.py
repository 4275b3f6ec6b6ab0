"""Who sees whom: per-token indices and segment ids of the queries and keys, and the visibility they imply.

A key is visible to a query when it is in the same segment (packed documents; segment 0 is padding, seen by no
one) and its index is not after the query's (causal). Indices are the tokens' places in their row's original
order (``0..T-1`` for a training row, the cache slots for decoding), so a row may be held in any permuted order
(the zig-zag order of context parallelism) and attention does not change.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    """Per-token indices and segment ids of queries (``[B,T]``) and keys (``[B,S]``)."""

    q_index: jax.Array
    q_segment: jax.Array
    k_index: jax.Array
    k_segment: jax.Array


def visible(layout: Layout) -> jax.Array:
    """``[B,T,S]``: key s is visible to query t."""
    q_i, q_s, k_i, k_s = layout
    same = q_s[:, :, None] == k_s[:, None, :]
    return same & (k_s > 0)[:, None, :] & (k_i[:, None, :] <= q_i[:, :, None])


def attention_layout(segment_ids: jax.Array, index: Optional[jax.Array] = None) -> Layout:
    """Who sees whom in a row of T tokens: causal (by ``index``, the tokens' places in the row, default
    ``0..T-1``), packed documents kept apart by ``segment_ids``, segment 0 (padding) seen by no one."""
    if index is None:
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    return Layout(index, segment_ids, index, segment_ids)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, T, T]`` causal mask that also keeps packed documents apart; segment id 0 marks padding."""
    return visible(attention_layout(segment_ids))


def cache_layout(positions: jax.Array, max_len: int, first_slot: int = 0) -> Layout:
    """Who sees whom when new tokens at consecutive ``positions [B,T]`` attend to a cache of ``max_len`` slots
    followed by themselves: cached slots before the first new token (and from ``first_slot`` on; slots at or
    after the first new token may hold stale values: padding, rejected drafts), then the new tokens causally
    (those at positions >= ``first_slot``). Slot s holds position s."""
    b = positions.shape[0]
    slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    cached = (slots < positions[:, :1]) & (slots >= first_slot)
    new = positions >= first_slot
    k_index = jnp.concatenate([slots, positions], axis=1)
    k_segment = jnp.concatenate([cached, new], axis=1).astype(jnp.int32)
    return Layout(positions, jnp.ones_like(positions), k_index, k_segment)


def cache_visibility(positions: jax.Array, max_len: int, first_slot: int = 0) -> jax.Array:
    """``[B,T,S+T]``: the keys (S cached slots, then the T new tokens) each new token sees (``cache_layout``)."""
    return visible(cache_layout(positions, max_len, first_slot))
