"""Blockwise attention: FlashAttention's recipe in plain jnp, with its own backward pass, so memory is
O(T x block), not O(T^2).

The forward pass runs over key blocks with a running max and sum and saves only the output and the per-row
log-sum-exp; the backward pass (``custom_vjp``) recomputes each block's probabilities from them and uses
``di = sum(o * do)``. A (query block, key block) pair that cannot hold a visible pair (every key index after
every query index) is skipped. Shapes as in ``reference.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.layout import Layout, visible
from deepseek_jax.layers.attention.reference import MASKED, group_heads
from deepseek_jax.parallel.shard_map import sum_to_vma, vary, varying_axes

DEFAULT_BLOCK = 512


def blockwise_attention(q, k, v, layout: Layout, scale: float, block_q: int = DEFAULT_BLOCK,
                        block_k: int = DEFAULT_BLOCK) -> jax.Array:
    """The same as ``naive_attention`` with O(T x block) memory in the forward and the backward pass."""
    b, t, h, _ = q.shape
    s, hk = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    pt, ps = -t % bq, -s % bk
    # Padding queries and keys get segment 0: no one sees them and they see no one.
    q_p = jnp.pad(group_heads(q, hk), ((0, 0), (0, pt), (0, 0), (0, 0), (0, 0)))
    k_p = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
    v_p = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)))  # noqa: E731
    lay = Layout(pad(layout.q_index, pt), pad(layout.q_segment, pt), pad(layout.k_index, ps),
                 pad(layout.k_segment, ps))
    out = _flash(q_p, k_p, v_p, lay, scale, bq, bk)
    return out[:, :t].reshape(b, t, h, v.shape[-1])


# ----- the blockwise kernel: q [B,T,Hk,G,Dk] (T a multiple of bq), k/v [B,S,Hk,D] (S a multiple of bk) -----------
def _blocks(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """Split ``axis`` into ``[n, size]`` and move n to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _live(lay: Layout, bq: int, bk: int) -> jax.Array:
    """``[nq, nk]``: a (query block, key block) pair may hold a visible pair (a key index not after every
    query index, in the whole batch)."""
    q_max = _blocks(lay.q_index, bq).max(axis=(1, 2))
    k_min = _blocks(jnp.where(lay.k_segment > 0, lay.k_index, jnp.iinfo(jnp.int32).max), bk).min(axis=(1, 2))
    return k_min[None, :] <= q_max[:, None]


def _block_scores(qb, kb, lq, lk, scale):
    """Scores ``[B,Hk,G,bq,bk]`` in fp32 and the mask ``[B,1,1,bq,bk]`` of one block pair."""
    s = jnp.einsum("btkgd,bskd->bkgts", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = visible(Layout(*lq, *lk))[:, None, None]
    return jnp.where(mask, s, MASKED), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, lay: Layout, scale: float, bq: int, bk: int):
    return _flash_fwd(q, k, v, lay, scale, bq, bk)[0]


def _flash_fwd(q, k, v, lay, scale, bq, bk):
    b, t, hk, g, _ = q.shape
    dv = v.shape[-1]
    qs, ks, vs = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    lqs = (_blocks(lay.q_index, bq), _blocks(lay.q_segment, bq))
    lks = (_blocks(lay.k_index, bk), _blocks(lay.k_segment, bk))
    live = _live(lay, bq, bk)
    axes = varying_axes(q, k, v, *lay)  # under shard_map, the loop carries vary like the step's results

    def q_block(i):
        qb, lq = qs[i], (lqs[0][i], lqs[1][i])

        def k_block(j, carry):
            m, l, acc = carry

            def step():
                s, mask = _block_scores(qb, ks[j], lq, (lks[0][j], lks[1][j]), scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vs[j], preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(live[i, j], step, lambda: (m, l, acc))

        init = tuple(vary(x, axes) for x in (jnp.full((b, hk, g, bq), MASKED, jnp.float32),
                                              jnp.zeros((b, hk, g, bq), jnp.float32),
                                              jnp.zeros((b, hk, g, bq, dv), jnp.float32)))
        m, l, acc = jax.lax.fori_loop(0, ks.shape[0], k_block, init)
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: p = 0 in the backward
        return jnp.moveaxis(o, 3, 1).astype(v.dtype), lse  # [B,bq,Hk,G,Dv], [B,Hk,G,bq]

    # The checkpoint keeps the loops whole when this runs inside a differentiated scan (the model's layer stack):
    # the scan's partial evaluation would otherwise hoist what depends only on loop-invariant inputs (the
    # layout's masks) out of the layer loop and keep it for every (query block, key block) pair, O(T^2) bytes.
    # Under the checkpoint its residuals are its inputs only; it costs nothing when nothing is differentiated.
    o, lse = jax.checkpoint(lambda: jax.lax.map(q_block, jnp.arange(qs.shape[0])),
                            policy=jax.checkpoint_policies.nothing_saveable)()
    out = jnp.moveaxis(o, 0, 1).reshape(b, t, hk, g, dv)
    return out, (q, k, v, lay, out, lse)


def _flash_bwd(scale, bq, bk, res, do):
    q, k, v, lay, out, lse = res
    qs, ks, vs = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    dos, os_ = _blocks(do, bq), _blocks(out, bq)
    lqs = (_blocks(lay.q_index, bq), _blocks(lay.q_segment, bq))
    lks = (_blocks(lay.k_index, bk), _blocks(lay.k_segment, bk))
    live = _live(lay, bq, bk)
    axes = varying_axes(q, k, v, *lay, out, lse, do)
    # di = rowsum(o * do), per query block: [nq, B, Hk, G, bq]
    di = jnp.einsum("nbtkgd,nbtkgd->nbkgt", os_.astype(jnp.float32), dos.astype(jnp.float32))

    def k_block(j, grads):
        dq, dk_all, dv_all = grads
        kb, vb, lk = ks[j], vs[j], (lks[0][j], lks[1][j])

        def q_block(i, carry):
            dk, dv, dq = carry

            def step():
                qb, dob = qs[i], dos[i]
                s, mask = _block_scores(qb, kb, (lqs[0][i], lqs[1][i]), lk, scale)
                p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)  # [B,Hk,G,bq,bk]
                dv_ = dv + jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), dob, preferred_element_type=jnp.float32)
                dp = jnp.einsum("btkgd,bskd->bkgts", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - di[i][..., None]) * scale
                dk_ = dk + jnp.einsum("bkgts,btkgd->bskd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgts,bskd->btkgd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
                return dk_, dv_, dq.at[i].add(dq_i)

            return jax.lax.cond(live[i, j], step, lambda: (dk, dv, dq))

        zero_k, zero_v = (vary(jnp.zeros(x.shape, jnp.float32), axes) for x in (kb, vb))
        dk, dv, dq = jax.lax.fori_loop(0, qs.shape[0], q_block, (zero_k, zero_v, dq))
        return dq, dk_all.at[j].set(dk), dv_all.at[j].set(dv)

    init = tuple(vary(jnp.zeros(x.shape, jnp.float32), axes) for x in (qs, ks, vs))
    dqs, dks, dvs = jax.lax.fori_loop(0, ks.shape[0], k_block, init)
    dq, dk, dv = (sum_to_vma(jnp.moveaxis(d, 0, 1).reshape(x.shape), x) for d, x in ((dqs, q), (dks, k), (dvs, v)))
    zeros = Layout(*(jnp.zeros(x.shape, jax.dtypes.float0) for x in lay))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


