"""Ragged decode attention over pages of the cache (``layout.PagedLayout``): each row's new tokens attend to
the pages its own length fills, so a short sequence beside a long one reads its own slots, not the long one's.

The pages of all rows form one flat work list of N items. Each item is attended to on its own (scores, their
max, the exponentials' sum and the weighted values, in fp32), and the items of a row are combined with the
new tokens' causal attention to themselves by the usual log-sum-exp rescaling (segment max / sum over the
items' rows). Work and reads follow the total filled length (rounded up to pages), not batch x longest row.

Shapes: B rows, T new tokens, H query heads, N items of G slots, Hk key/value heads (1: MLA's shared latent),
Dv value dim. Scores may come in parts (MLA's latent and rope keys), summed, so no part is concatenated.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.layout import PagedLayout
from deepseek_jax.layers.attention.reference import MASKED, _pv, _qk


def _scores(q_parts: Sequence[jax.Array], k_parts: Sequence[jax.Array], scale: float) -> jax.Array:
    return sum(_qk(q, k) for q, k in zip(q_parts, k_parts)) * scale  # [*,H,T,S] fp32


def paged_attention(q_parts: Sequence[jax.Array], k_pages: Sequence[jax.Array], v_pages: jax.Array,
                    k_new: Sequence[jax.Array], v_new: jax.Array, layout: PagedLayout, scale: float) -> jax.Array:
    """softmax over (a row's filled pages, then its new tokens causally) of ``q . k * scale``, times the values.

    q_parts ``[B,T,H,D_i]``; k_pages ``[N,G,Hk,D_i]`` and v_pages ``[N,G,Hk,Dv]`` (the items' slots, gathered);
    k_new ``[B,T,Hk,D_i]``, v_new ``[B,T,Hk,Dv]`` (the new tokens') -> ``[B,T,H,Dv]`` in v_new's dtype.
    """
    b = layout.q_index.shape[0]
    rows = layout.item_row
    # each item against its row's queries
    s = _scores([q[rows] for q in q_parts], k_pages, scale)  # [N,H,T,G]
    seen = (layout.item_slots < layout.item_len[:, None])[:, None, None, :]
    s = jnp.where(seen, s, MASKED)
    m_item = jnp.max(s, axis=-1)  # [N,H,T]
    e = jnp.where(seen, jnp.exp(s - m_item[..., None]), 0.0)
    # the new tokens, causally among themselves (each sees itself: every row's max is a real score)
    s_new = _scores(q_parts, k_new, scale)  # [B,H,T,T]
    causal = (layout.q_index[:, None, :] <= layout.q_index[:, :, None])[:, None]
    s_new = jnp.where(causal, s_new, MASKED)
    m = jnp.maximum(jnp.max(s_new, axis=-1), jax.ops.segment_max(m_item, rows, num_segments=b))  # [B,H,T]
    e_new = jnp.where(causal, jnp.exp(s_new - m[..., None]), 0.0)
    w = jnp.exp(m_item - m[rows])  # [N,H,T]: each item's rescaling to its row's max
    total = e_new.sum(-1) + jax.ops.segment_sum(e.sum(-1) * w, rows, num_segments=b)  # [B,H,T]
    o_items = _pv(e * w[..., None], v_pages.astype(jnp.float32))  # [N,T,H,Dv]
    out = _pv(e_new, v_new.astype(jnp.float32)) + jax.ops.segment_sum(o_items, rows, num_segments=b)
    return (out / jnp.transpose(total, (0, 2, 1))[..., None]).astype(v_new.dtype)
