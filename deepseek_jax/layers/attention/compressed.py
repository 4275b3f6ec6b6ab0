"""DeepSeek-V4's attention core: every query head reads one shared K=V head over a sliding window of the row's
own tokens plus a pool of compressed entries, with a learned sink per head (docs/reference.md, V4).

For query t (index i, segment s), the keys are:
- the window: tokens j of segment s with ``i - window < j <= i``;
- the pool: compressed entries c of segment s whose last source token is at or before i (``pool_index[c] <= i``):
  all of them (HCA, or CSA without an indexer choice), or only those the indexer picked (CSA: ``selected``).
``softmax([scale q.k ..., sink_h])`` without the sink's column weighs the values (K = V).

Blockwise over queries (``q_block`` at a time, a ``lax.scan`` whose blocks run under ``jax.checkpoint``): a block
reads its ``q_block + window - 1`` window keys by a slice and its pool entries whole (HCA: ``[B, q_block, H, C]``
scores) or gathered (CSA: ``[B, q_block, K, D]`` rows), so nothing of size ``[T, T]`` is formed. The rows hold
their tokens in order (slot j is index j).

Decoding reads the same keys from the cache (``layers/csa.py``'s ``decode_parts``: the window's ring, the new
tokens, the pool or the picked entries) through ``sink_attention``, the softmax-with-sink both paths share.

Shapes: B batch, T queries, H heads, D head dim, C pool entries, K picked entries per query.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.sparse import _query_blocks, _unblock

HIGHEST = jax.lax.Precision.HIGHEST


def _scores(q: jax.Array, keys: jax.Array, spec: str, scale: float) -> jax.Array:
    return jnp.einsum(spec, q, keys.astype(q.dtype), preferred_element_type=jnp.float32,
                      precision=HIGHEST if q.dtype == jnp.float32 else None) * scale


def sink_attention(q: jax.Array, parts, sinks: jax.Array, scale: float) -> jax.Array:
    """``softmax([scale q.k ..., sink_h])`` (the sink's column dropped) over the keys of ``parts``, each a pair
    ``(keys, mask)``: keys every query may read ``[B,S,D]`` with ``mask [B,T,S]``, or each query's own
    ``[B,T,K,D]`` with ``mask [B,T,K]``; the keys are the values (K = V). ``q [B,T,H,D]``, ``sinks [H]`` fp32.
    -> ``[B,T,H,D]`` in q's dtype (fp32 scores and sums)."""
    logits, values = [], []
    for keys, mask in parts:
        spec, back = ("bthd,bsd->bths", "bths,bsd->bthd") if keys.ndim == 3 else ("bthd,btkd->bthk",
                                                                                  "bthk,btkd->bthd")
        logits.append(jnp.where(mask[:, :, None, :], _scores(q, keys, spec, scale), -jnp.inf))
        values.append((back, keys))
    top = jnp.maximum(jnp.max(jnp.stack([x.max(-1) for x in logits]), axis=0), sinks)  # [B, T, H]
    total = jnp.exp(sinks - top)
    out = jnp.zeros(q.shape, jnp.float32)
    for x, (spec, v) in zip(logits, values):
        p = jnp.exp(x - top[..., None])
        total = total + p.sum(-1)
        out = out + jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                               precision=HIGHEST if v.dtype == jnp.float32 else None)
    return (out / total[..., None]).astype(q.dtype)


def window_pool_attention(q: jax.Array, kv: jax.Array, sinks: jax.Array, q_index: jax.Array, q_segment: jax.Array,
                          pool: Optional[jax.Array] = None, pool_index: Optional[jax.Array] = None,
                          pool_segment: Optional[jax.Array] = None, selected=None, *, window: int, scale: float,
                          q_block: int = 128) -> jax.Array:
    """``q [B,T,H,D]``, ``kv [B,T,D]`` (the rows' own entries, slot = index; ``q_segment`` ``[B,T]`` is also the
    keys' segment), ``sinks [H]``; ``pool [B,C,D]`` with the index of each entry's last source token
    ``pool_index [B,C]`` and its segment ``pool_segment [B,C]`` (0: seen by no one), or None (window only);
    ``selected``: None (every visible pool entry) or ``(idx, valid)`` ``[B,T,K]`` (the indexer's picks).
    -> ``[B,T,H,D]`` in q's dtype."""
    b, t, h, d = q.shape
    left = window - 1
    qb, nq, (qs, qis, qss) = _query_blocks((q, q_index, q_segment), t, q_block, (0, -1, 0))
    tp = qb * nq
    kv_p = jnp.pad(kv, ((0, 0), (left, tp - t), (0, 0)))
    seg_p = jnp.pad(q_segment, ((0, 0), (left, tp - t)))
    has_pool = pool is not None and pool.shape[1] > 0
    if selected is not None and has_pool:
        _, _, (ids, oks) = _query_blocks(selected, t, q_block, (0, False))
    else:
        ids = oks = jnp.zeros((nq, 1), jnp.int32)  # unused
    sinks = sinks.astype(jnp.float32)

    @partial(jax.checkpoint, prevent_cse=False)
    def block(i, qq, qi, qseg, ii, ok, kv_p, seg_p, pool, pool_index, pool_segment):
        start = i * qb
        keys = jax.lax.dynamic_slice_in_dim(kv_p, start, qb + left, axis=1)  # slots start - left .. start + qb - 1
        kseg = jax.lax.dynamic_slice_in_dim(seg_p, start, qb + left, axis=1)
        kidx = start - left + jnp.arange(qb + left, dtype=jnp.int32)
        seen = ((kseg[:, None, :] == qseg[:, :, None]) & (kseg > 0)[:, None, :]
                & (kidx[None, None, :] <= qi[:, :, None]) & (qi[:, :, None] - kidx[None, None, :] < window))
        parts = [(keys, seen)]
        if has_pool and selected is None:
            parts.append((pool, (pool_segment[:, None, :] == qseg[:, :, None]) & (pool_segment > 0)[:, None, :]
                          & (pool_index[:, None, :] <= qi[:, :, None])))
        elif has_pool:
            parts.append((jax.vmap(lambda table, sel: table[sel])(pool, jnp.clip(ii, 0, pool.shape[1] - 1)), ok))
        return sink_attention(qq, parts, sinks, scale)

    pool_args = (pool, pool_index, pool_segment) if has_pool else (None, None, None)

    def step(_, part):
        return None, block(*part, kv_p, seg_p, *pool_args)

    _, out = jax.lax.scan(step, None, (jnp.arange(nq, dtype=jnp.int32), qs, qis, qss, ids, oks))
    return _unblock(out, t)


def naive_window_pool_attention(q, kv, sinks, q_index, q_segment, pool=None, pool_index=None, pool_segment=None,
                                selected=None, *, window: int, scale: float) -> jax.Array:
    """The same attention with the whole ``[B,T,H,T+C]`` score matrix (a reference for tests; O(T^2) memory)."""
    seen = ((q_segment[:, None, :] == q_segment[:, :, None]) & (q_segment > 0)[:, None, :]
            & (q_index[:, None, :] <= q_index[:, :, None]) & (q_index[:, :, None] - q_index[:, None, :] < window))
    keys, masks = [kv], [seen]
    if pool is not None and pool.shape[1] > 0:
        pseen = ((pool_segment[:, None, :] == q_segment[:, :, None]) & (pool_segment > 0)[:, None, :]
                 & (pool_index[:, None, :] <= q_index[:, :, None]))
        if selected is not None:
            idx, valid = selected
            picked = (jax.nn.one_hot(jnp.where(valid, idx, -1), pool.shape[1], dtype=jnp.int32).sum(-2) > 0)
            pseen = pseen & picked
        keys.append(pool)
        masks.append(pseen)
    keys, mask = jnp.concatenate(keys, axis=1), jnp.concatenate(masks, axis=-1)
    s = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), keys.astype(jnp.float32), precision=HIGHEST) * scale
    s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, None, :, None], (*s.shape[:3], 1))
    p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("bths,bsd->bthd", p, keys.astype(jnp.float32), precision=HIGHEST).astype(q.dtype)
