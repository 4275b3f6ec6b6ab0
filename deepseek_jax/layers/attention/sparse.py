"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): the lightning indexer's top-k selection and MLA over the
selected latent entries only, both blockwise (docs/reference.md, V3.2).

The indexer scores every visible key s for query t, ``I[t, s] = sum_j w[t, j] ReLU(scale q[t, j] . k[s])`` (fp32),
and each query keeps its ``topk`` best keys; attention then reads only those. Neither ever forms the ``[T, S]``
score matrix: queries go in blocks of ``q_block`` (a ``lax.scan``), and for each the indexer walks the keys in
blocks of ``k_block``, merging each block's candidates with the ``topk`` kept so far (a running top-k); the
attention of a query block gathers its ``[q_block, topk]`` latent rows and attends in the absorbed (latent) form,
under ``jax.checkpoint`` so that the backward pass keeps no block's gathered rows.

Shapes: B batch, T queries, S keys, H heads (the indexer's Hi, or MLA's), D the indexer's head dim, R + P the
latent entry (``kv_lora_rank`` + ``qk_rope_head_dim``), K = min(topk, S).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.layout import Layout, visible

NEG = -jnp.inf


def index_scores(q: jax.Array, k: jax.Array, w: jax.Array, scale: float) -> jax.Array:
    """``I [B,T,S]`` fp32 of queries ``q [B,T,Hi,D]`` against keys ``k [B,S,D]`` with head weights ``w [B,T,Hi]``:
    ``sum_j w[t, j] ReLU(scale q[t, j] . k[s])`` (the reference's order: scale, ReLU, weighted head sum)."""
    s = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bth,bths->bts", w.astype(jnp.float32), jax.nn.relu(s * scale),
                      precision=jax.lax.Precision.HIGHEST)


def _blocks(n: int, block: int) -> tuple[int, int]:
    """``(block, count)``: ``n`` padded up to a multiple of ``min(block, n)``."""
    block = max(1, min(block, n))
    return block, -(-n // block)


def _pad_to(x: jax.Array, axis: int, n: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _parts(k) -> tuple:
    """Keys given whole (``[B,S,...]``) or as parts laid end to end along S (the cache, then the new tokens: never
    concatenated, so that decoding reads the cache in place) -> a tuple of parts."""
    return tuple(k) if isinstance(k, (tuple, list)) else (k,)


def take_rows(parts, idx: jax.Array) -> jax.Array:
    """Rows ``idx [B,...]`` (slots of the parts laid end to end) of tables ``[B,S_i,F]``, each part a table or a
    tuple of tables whose features are concatenated after the gather -> ``[B,...,F]``."""
    out, start = None, 0
    for part in parts:
        columns = part if isinstance(part, (tuple, list)) else (part,)
        n = columns[0].shape[1]
        local = jnp.clip(idx - start, 0, n - 1)
        rows = [jax.vmap(lambda table, sel: table[sel])(c, local) for c in columns]
        rows = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=-1)
        out = rows if out is None else jnp.where(((idx >= start) & (idx < start + n))[..., None], rows, out)
        start += n
    return out


def indexer_topk(q: jax.Array, k, w: jax.Array, layout: Layout, topk: int, scale: float,
                 q_block: int = 128, k_block: int = 512) -> tuple[jax.Array, jax.Array]:
    """Each query's ``topk`` visible keys by index score (``index_scores``), blockwise with a running top-k.

    ``k``: the keys ``[B,S,D]``, or parts of them laid end to end along S (``_parts``), read in place: blocks of
    ``k_block`` keys are sliced out of each part (a last partial block on its own), never padded or copied.
    ``layout``: who sees whom (causal, packed documents apart, padding seen by no one), its keys the parts' slots
    in order. Returns the keys' slots ``idx [B,T,K]`` int32 and ``valid [B,T,K]``: False where the query sees
    fewer than K keys (those slots are filler, never attended). A query's kept set is exactly the top-K of its
    visible scores (ties to the earlier slot).
    """
    parts = _parts(k)
    b, t = q.shape[:2]
    kk = min(topk, sum(part.shape[1] for part in parts))
    _, _, (qs, ws, q_index, q_segment) = _query_blocks((q, w, layout.q_index, layout.q_segment), t, q_block,
                                                       (0, 0, 0, -1))

    def query_block(_, qpart):
        qq, qw, qi, qseg = qpart

        def merge(kept, start, size, keys):
            """Merge the keys at slots ``[start, start + size)`` (``keys [B, size, D]``) into the kept set."""
            vals, idx = kept
            k_index = jax.lax.dynamic_slice_in_dim(layout.k_index, start, size, axis=1)
            k_segment = jax.lax.dynamic_slice_in_dim(layout.k_segment, start, size, axis=1)
            sc = index_scores(qq, keys, qw, scale)  # [B, qb, size]
            sc = jnp.where(visible(Layout(qi, qseg, k_index, k_segment)), sc, NEG)
            slots = start + jnp.arange(size, dtype=jnp.int32)
            merged_vals = jnp.concatenate([vals, sc], axis=-1)
            merged_idx = jnp.concatenate([idx, jnp.broadcast_to(slots, sc.shape)], axis=-1)
            vals, pick = jax.lax.top_k(merged_vals, kk)
            return vals, jnp.take_along_axis(merged_idx, pick, axis=-1)

        zero = jnp.zeros_like(qw[..., :1], jnp.int32)  # [B, qb, 1]: derived from the queries, so that under
        # shard_map the kept set varies over the same mesh axes as they do (scan needs the carry's types equal)
        qb = qq.shape[1]
        kept = (jnp.broadcast_to(zero.astype(jnp.float32) + NEG, (b, qb, kk)), jnp.broadcast_to(zero, (b, qb, kk)))
        offset = 0
        for part in parts:
            n = part.shape[1]
            kb = min(k_block, n)
            full = n // kb
            if full == 1:
                kept = merge(kept, offset, kb, part[:, :kb])
            elif full > 1:
                def key_block(kept, i, part=part, offset=offset, kb=kb):
                    keys = jax.lax.dynamic_slice_in_dim(part, i * kb, kb, axis=1)
                    return merge(kept, offset + i * kb, kb, keys), None

                kept, _ = jax.lax.scan(key_block, kept, jnp.arange(full, dtype=jnp.int32))
            if n > full * kb:
                kept = merge(kept, offset + full * kb, n - full * kb, part[:, full * kb:])
            offset += n
        vals, idx = kept
        return None, (idx, vals > NEG)

    _, (idx, valid) = jax.lax.scan(query_block, None, (qs, ws, q_index, q_segment))
    return _unblock(idx, t), _unblock(valid, t)


def _query_blocks(arrays, t: int, q_block: int, fills):
    """``[B,T,...]`` arrays -> ``[nq, B, qb, ...]`` blocks of ``qb`` queries (T padded with ``fills``)."""
    qb, nq = _blocks(t, q_block)
    return qb, nq, tuple(_pad_to(a, 1, qb * nq, f).reshape(a.shape[0], nq, qb, *a.shape[2:]).swapaxes(0, 1)
                         for a, f in zip(arrays, fills))


def _unblock(x: jax.Array, t: int) -> jax.Array:
    """``[nq, B, qb, ...]`` -> ``[B, T, ...]``."""
    nq, b, qb = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, nq * qb, *x.shape[3:])[:, :t]


def selected_index_scores(q: jax.Array, k, w: jax.Array, idx: jax.Array, scale: float,
                          q_block: int = 64) -> jax.Array:
    """The index scores of each query's selected keys, ``[B,T,K]`` (``index_scores`` at ``idx``; ``k`` whole or in
    parts, as ``indexer_topk`` takes it): the indexer's logits for its KL over the selected set. Blockwise over
    queries (``[B, q_block, K, Di]`` gathered at a time), each block under ``jax.checkpoint``: the backward pass
    recomputes a block's gathered keys and per-head scores (``[B, q_block, Hi, K]``) instead of keeping them for
    the whole sequence."""
    t = q.shape[1]
    parts = _parts(k)
    _, _, (qs, ws, ids) = _query_blocks((q, w, idx), t, q_block, (0, 0, 0))

    @partial(jax.checkpoint, prevent_cse=False)
    def block(qq, qw, ii, parts):
        keys = take_rows(parts, ii).astype(jnp.float32)  # [B, qb, K, Di]
        s = jnp.einsum("bthd,btkd->bthk", qq.astype(jnp.float32), keys, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum("bth,bthk->btk", qw.astype(jnp.float32), jax.nn.relu(s * scale),
                          precision=jax.lax.Precision.HIGHEST)

    def step(_, part):
        return None, block(*part, parts)

    _, out = jax.lax.scan(step, None, (qs, ws, ids))
    return _unblock(out, t)


def sparse_latent_attention(q: jax.Array, kv: jax.Array, idx: jax.Array, valid: jax.Array, scale: float,
                            rank: int, q_block: int = 64, return_probs: bool = False):
    """MLA in the absorbed (latent) form over each query's selected entries only.

    ``q [B,T,H,R+P]``: absorbed queries (``q_nope W_uk`` then ``q_pe``); ``kv [B,S,R+P]``: the latent cache rows
    (``c_kv`` then ``k_pe``), or parts laid end to end along S, each a ``[B,S_i,R+P]`` table or a pair ``(c_kv,
    k_pe)`` (the cache and the new tokens, read in place: only the selected rows are gathered); ``idx`` /
    ``valid`` ``[B,T,K]`` from ``indexer_topk``. Per query block the K rows
    are gathered, scored (fp32), softmaxed over the valid ones and their first ``rank`` dims (``c_kv``) averaged:
    -> ``[B,T,H,R]`` in q's dtype (0 for a query with no valid entry). Memory per block ``[B, q_block, K, R+P]``;
    the blocks run under ``jax.checkpoint`` (their gathered rows are recomputed in the backward pass).
    ``return_probs``: also the attention probabilities summed over heads, ``[B,T,K]`` fp32 (the indexer's KL
    target in the sparse stage).
    """
    t = q.shape[1]
    parts = _parts(kv)
    _, _, (qs, ids, oks) = _query_blocks((q, idx, valid), t, q_block, (0, 0, False))

    @partial(jax.checkpoint, prevent_cse=False)
    def block(qq, ii, ok, parts):
        rows = take_rows(parts, ii)  # [B, qb, K, R+P]
        sc = jnp.einsum("bthe,btke->bthk", qq, rows, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST) * scale
        mask = ok[:, :, None, :]
        p = jax.nn.softmax(jnp.where(mask, sc, -1e30), axis=-1)
        p = jnp.where(mask, p, 0.0)
        out = jnp.einsum("bthk,btkr->bthr", p, rows[..., :rank].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        return out.astype(q.dtype), (p.sum(2) if return_probs else None)

    def step(_, part):
        return None, block(*part, parts)

    _, (out, probs) = jax.lax.scan(step, None, (qs, ids, oks))
    return (_unblock(out, t), _unblock(probs, t)) if return_probs else _unblock(out, t)


def sparse_core(q, kv, qi, ki, wi, layout: Layout, *, topk: int, scale: float, index_scale: float, rank: int,
                block: int, with_kl: bool = False):
    """DSA over a whole set of keys: the indexer's top-``topk`` per query (``indexer_topk``), then the absorbed
    attention over those entries (``sparse_latent_attention``). ``q [B,T,H,R+P]``, ``kv`` the latent rows
    ``[B,S,R+P]`` (or parts, as ``sparse_latent_attention`` takes them), the indexer's ``qi [B,T,Hi,Di]``,
    ``ki [B,S,Di]`` (or parts, the same lengths), ``wi [B,T,Hi]``. -> ``[B,T,H,R]`` and, ``with_kl``, the sparse
    stage's KL inputs ``(index logits, head-summed attention probabilities, valid)`` ``[B,T,K]`` (``indexer_kl_loss``'s
    arguments; the probabilities sum this call's heads only), else None; and the chosen keys' slots ``[B,T,K]``,
    -1 where fewer than K are visible."""
    idx, valid = indexer_topk(qi, ki, wi, layout, topk, index_scale, q_block=min(block, 128), k_block=block)
    out = sparse_latent_attention(q, kv, idx, valid, scale, rank, q_block=min(block, 64), return_probs=with_kl)
    chosen = jnp.where(valid, idx, -1)
    if not with_kl:
        return out, None, chosen
    out, probs = out
    return out, (selected_index_scores(qi, ki, wi, idx, index_scale, q_block=min(block, 64)), probs, valid), chosen


def indexer_kl_loss(index_logits: jax.Array, attention_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """The indexer's training loss (DeepSeek-V3.2): per query, ``KL(p || softmax(I))`` where the target ``p`` is the
    main attention's probabilities summed over heads and L1-normalized over the keys in ``mask``, and the
    indexer's distribution is the softmax of its scores over the same keys; summed over the queries that have
    any. ``index_logits`` / ``attention_probs`` / ``mask`` ``[B,T,S]`` (the dense warm-up: the visible keys; the
    sparse stage: the selected ones, gathered to ``[B,T,K]``); ``attention_probs`` is a target (no gradient).
    Returns the sum over queries (fp32); divide by the query count for a mean."""
    p = jax.lax.stop_gradient(jnp.where(mask, attention_probs.astype(jnp.float32), 0.0))
    total = p.sum(-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    logq = jax.nn.log_softmax(jnp.where(mask, index_logits.astype(jnp.float32), -1e30), axis=-1)
    kl = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0).sum(-1)
    return jnp.where(total[..., 0] > 0, kl, 0.0).sum()
