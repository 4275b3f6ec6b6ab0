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


class PagedLayout(NamedTuple):
    """Who sees whom in a ragged decode step: each row's new tokens see the cached slots before its first new
    token, read as a flat work list of pages (``paged_layout``), then themselves causally.

    ``q_index`` / ``q_segment`` ``[B,T]``: the new tokens' positions and segments (1). The work list has N items
    of ``page`` slots each: item i reads row ``item_row[i]``'s slots ``item_slots[i] [page]``, of which those
    below ``item_len[i]`` are filled (0 for the items past the list's end, which read nothing).
    """

    q_index: jax.Array
    q_segment: jax.Array
    item_row: jax.Array
    item_slots: jax.Array
    item_len: jax.Array


def pages_needed(lengths, page: int) -> int:
    """Pages of ``page`` slots that cached ``lengths`` (one per row) fill: the work list a paged step needs."""
    return int(sum(-(-int(n) // page) for n in lengths))


def paged_layout(positions: jax.Array, pages: int, page: int) -> PagedLayout:
    """The work list of a decode step whose new tokens sit at consecutive ``positions [B,T]``: row b's filled
    slots ``0..positions[b,0]-1`` cut into pages of ``page`` slots, all rows' pages one after another, padded
    to ``pages`` items (static; at least ``pages_needed`` of the rows' lengths, or the last pages are lost).
    A row's work follows its own length, not the longest row's."""
    b = positions.shape[0]
    lengths = positions[:, 0]
    counts = -(-lengths // page)
    ends = jnp.cumsum(counts)
    item = jnp.arange(pages, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(ends, item, side="right"), b - 1).astype(jnp.int32)
    first = (item - (ends - counts)[row]) * page
    valid = item < ends[-1]
    slots = jnp.where(valid, first, 0)[:, None] + jnp.arange(page, dtype=jnp.int32)
    return PagedLayout(positions, jnp.ones_like(positions), row, slots, jnp.where(valid, lengths[row], 0))
