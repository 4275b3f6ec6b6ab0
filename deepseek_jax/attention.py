"""Attention cores for MLA's shapes: the naive reference, blockwise (online-softmax) attention with its own
backward pass, so memory is O(T x block), not O(T^2), the Pallas TPU splash kernel for a row's causal
self-attention (``splash_attention``), and cuDNN's fused attention on GPU for unpacked rows (``cudnn_attention``).

Shapes: B batch, T queries, S keys, H query heads, Hk key/value heads (H for the full MLA path; 1 for the
absorbed path, whose single "head" is the shared latent), Dk q/k head dim (nope + rope), Dv value head dim.
q ``[B,T,H,Dk]``, k ``[B,S,Hk,Dk]``, v ``[B,S,Hk,Dv]`` -> ``[B,T,H,Dv]``.

Which key a query sees (``visible``): the same segment (packed documents; segment 0 is padding, seen by no one)
and a key index not after the query's (causal). Indices are the tokens' places in their row's original order
(``0..T-1`` for a training row, the cache slots for decoding), so a row may be held in any permuted order (the
zig-zag order of context parallelism) and attention does not change. A query that sees no key (padding) gives 0.

Blockwise attention follows FlashAttention's recipe in plain jnp: the forward pass runs over key blocks with a
running max and sum and saves only the output and the per-row log-sum-exp; the backward pass (``custom_vjp``)
recomputes each block's probabilities from them and uses ``di = sum(o * do)``. A (query block, key block) pair
that cannot hold a visible pair (every key index after every query index) is skipped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .grouped import _varying_axes, _vary

ATTENTION_IMPLS = ("auto", "blockwise", "naive", "splash", "cudnn")
DEFAULT_BLOCK = 512
_EMPTY = -1e30  # masked score: finite, so a fully masked block gives exp(0) = 1 that the mask then zeroes


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


def _group(q: jax.Array, hk: int) -> jax.Array:
    """``[B,T,H,D]`` -> ``[B,T,Hk,G,D]``: query heads grouped by the key head they share."""
    b, t, h, d = q.shape
    return q.reshape(b, t, hk, h // hk, d)


def _qk(q, k):
    """Scores ``[B,H,T,S]`` (fp32) of q ``[B,T,H,D]`` against k ``[B,S,Hk,D]``: as plain per-head (Hk = H) or
    shared-head (Hk = 1) einsums where they apply (XLA:CPU runs them faster than the grouped form)."""
    b, t, h, _ = q.shape
    hk = k.shape[2]
    if hk == h:
        return jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if hk == 1:
        return jnp.einsum("bthd,bsd->bhts", q, k[:, :, 0], preferred_element_type=jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", _group(q, hk), k, preferred_element_type=jnp.float32)
    return s.reshape(b, h, t, k.shape[1])


def _pv(p, v):
    """``p [B,H,T,S]`` times v ``[B,S,Hk,D]`` -> ``[B,T,H,D]`` (fp32)."""
    b, h, t, s = p.shape
    hk = v.shape[2]
    if hk == h:
        return jnp.einsum("bhts,bshd->bthd", p, v, preferred_element_type=jnp.float32)
    if hk == 1:
        return jnp.einsum("bhts,bsd->bthd", p, v[:, :, 0], preferred_element_type=jnp.float32)
    o = jnp.einsum("bkgts,bskd->btkgd", p.reshape(b, hk, h // hk, t, s), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, v.shape[-1])


def naive_attention(q, k, v, layout: Layout, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with fp32 scores and softmax over the whole ``[T, S]``: the reference."""
    mask = visible(layout)[:, None]
    scores = jnp.where(mask, _qk(q, k) * scale, _EMPTY)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)  # a row that sees nothing gives 0
    return _pv(probs, v).astype(v.dtype)


def blockwise_attention(q, k, v, layout: Layout, scale: float, block_q: int = DEFAULT_BLOCK,
                        block_k: int = DEFAULT_BLOCK) -> jax.Array:
    """The same as ``naive_attention`` with O(T x block) memory in the forward and the backward pass."""
    b, t, h, _ = q.shape
    s, hk = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    pt, ps = -t % bq, -s % bk
    # Padding queries and keys get segment 0: no one sees them and they see no one.
    q_p = jnp.pad(_group(q, hk), ((0, 0), (0, pt), (0, 0), (0, 0), (0, 0)))
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
    return jnp.where(mask, s, _EMPTY), mask


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
    axes = _varying_axes(q, k, v, *lay)  # under shard_map, the loop carries vary like the step's results

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

        init = tuple(_vary(x, axes) for x in (jnp.full((b, hk, g, bq), _EMPTY, jnp.float32),
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
    axes = _varying_axes(q, k, v, *lay, out, lse, do)
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

        zero_k, zero_v = (_vary(jnp.zeros(x.shape, jnp.float32), axes) for x in (kb, vb))
        dk, dv, dq = jax.lax.fori_loop(0, qs.shape[0], q_block, (zero_k, zero_v, dq))
        return dq, dk_all.at[j].set(dk), dv_all.at[j].set(dv)

    init = tuple(_vary(jnp.zeros(x.shape, jnp.float32), axes) for x in (qs, ks, vs))
    dqs, dks, dvs = jax.lax.fori_loop(0, ks.shape[0], k_block, init)
    dq, dk, dv = (_sum_to_vma(jnp.moveaxis(d, 0, 1).reshape(x.shape), x) for d, x in ((dqs, q), (dks, k), (dvs, v)))
    zeros = Layout(*(jnp.zeros(x.shape, jax.dtypes.float0) for x in lay))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros


def _sum_to_vma(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """Under ``shard_map``, the cotangent of an input that is the same on every device of an axis (keys and values
    whole on each context shard) is the sum of each device's part over that axis."""
    extra = tuple(sorted(_varying_axes(grad) - _varying_axes(primal)))
    return jax.lax.psum(grad, extra) if extra else grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def splash_attention(q, k, v, q_segment, k_segment, scale: float, block: int = DEFAULT_BLOCK,
                     interpret: bool = False) -> jax.Array:
    """A row's causal self-attention (query and key t at place t of the row, ``T == S``) with packed segments,
    by the Pallas TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``, forward and backward
    kernels): the same values as ``naive_attention`` on that layout.

    q ``[B,T,H,Dk]``, k ``[B,T,Hk,Dk]`` (Hk = 1: the kernel's MQA form; grouped heads, 1 < Hk < H, are repeated to
    the H query heads), v ``[B,T,Hk,Dv]``; segments ``[B,T]``. The block is rounded up to a multiple of 128; the
    rows are padded to a multiple of it with segment 0, head dims to a multiple of 128 with zeros (which change no
    score). Splash lets segment 0 (padding) attend to itself; those rows are zeroed
    after, as the other cores give. Under a mesh the kernel runs per device (``jax.shard_map``) on its batch and
    head shards. ``interpret`` runs Pallas' interpreter (any backend; slow: for tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, dk = q.shape
    if 1 < k.shape[2] < h:
        k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
    hk, dv = k.shape[2], v.shape[-1]
    if k.shape[1] != t:
        raise ValueError(f"splash attention is a row's self-attention: {t} queries but {k.shape[1]} keys")
    up = lambda n: -(-n // 128) * 128  # noqa: E731  (the kernel's blocks and head dims: multiples of 128 lanes)
    bq = min(up(block), up(t))
    pt = -t % bq
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pt), (0, 0), (0, up(dk) - dk)))
    k = jnp.pad(k, ((0, 0), (0, pt), (0, 0), (0, up(dk) - dk)))
    v = jnp.pad(v, ((0, 0), (0, pt), (0, 0), (0, up(dv) - dv)))
    q_seg = jnp.pad(q_segment, ((0, 0), (0, pt)))
    k_seg = jnp.pad(k_segment, ((0, 0), (0, pt)))
    n = t + pt
    sizes = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                          block_kv_dkv_compute=bq, use_fused_bwd_kernel=True)

    def local(q, k, v, q_seg, k_seg):
        heads = q.shape[2]
        mask = sm.MultiHeadMask([sm.CausalMask((n, n)) for _ in range(heads)])
        make = sk.make_splash_mqa if hk == 1 else sk.make_splash_mha
        kernel = make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        kv = (lambda x: x[:, 0]) if hk == 1 else (lambda x: jnp.swapaxes(x, 0, 1))

        def row(q, k, v, qs, ks):  # q [T,H,D] -> [H,T,D]
            return kernel(jnp.swapaxes(q, 0, 1), kv(k), kv(v), segment_ids=sk.SegmentIds(qs, ks))

        return jnp.swapaxes(jax.vmap(row)(q, k, v, q_seg, k_seg), 1, 2)  # [B,T,H,Dv]

    from .context_parallel import current_mesh

    mesh = current_mesh()
    if mesh is not None:
        from jax.sharding import PartitionSpec as P

        from .sharding import dividing_axes

        bt = dividing_axes("act_batch", b, mesh) or None
        ht = (dividing_axes("heads", h, mesh) or None) if hk == h else None
        qs, kvs, ss = P(bt, None, ht, None), P(bt, None, ht if hk == h else None, None), P(bt, None)
        # check_vma off: a Pallas call cannot declare how its outputs vary (they vary as its inputs do).
        local = jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, ss, ss), out_specs=qs, check_vma=False)
    out = local(q, k, v, q_seg, k_seg)[:, :t, :, :dv]
    return jnp.where((q_segment > 0)[:, :, None, None], out, 0).astype(v.dtype)


def single_document(segment: jax.Array) -> jax.Array:
    """``[]`` bool: every row of ``segment [B,T]`` is one document from place 0 followed by padding (segment 0):
    ``s, .., s, 0, .., 0``, the layout that per-row lengths describe."""
    length = jnp.sum(segment > 0, axis=1, keepdims=True)
    place = jnp.arange(segment.shape[1])[None]
    return jnp.all(segment == jnp.where(place < length, segment[:, :1], 0))


def cudnn_attention(q, k, v, layout: Layout, scale: float, block: int = DEFAULT_BLOCK,
                    implementation: str = "cudnn") -> jax.Array:
    """A row's causal self-attention (query and key t at place t, ``T == S``) by ``jax.nn.dot_product_attention``
    (``implementation="cudnn"``: cuDNN's fused flash attention on GPU; "xla" materializes the scores: for tests).

    It takes no segment ids, only per-row lengths, so it runs when every row is one document followed by
    padding (``single_document``, checked on the values: right-padded prompts, unpacked training rows); packed
    rows take the blockwise core (``lax.cond``: both are compiled, one runs). It needs V's head dim equal to
    q/k's: V is padded with zeros to Dk (no score changes; the extra output columns are 0) and the output sliced
    back to Dv. Rows of padding give 0, as in the other cores."""
    dk, dv = q.shape[-1], v.shape[-1]
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"cudnn attention is a row's self-attention: {q.shape[1]} queries but {k.shape[1]} keys")

    def fused(q, k, v):
        lengths = jnp.sum(layout.q_segment > 0, axis=1).astype(jnp.int32)
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dk - dv))) if dv < dk else v
        out = jax.nn.dot_product_attention(q, k, vp, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths, implementation=implementation)
        return jnp.where((layout.q_segment > 0)[:, :, None, None], out[..., :dv], 0).astype(v.dtype)

    def packed(q, k, v):
        return blockwise_attention(q, k, v, layout, scale, block, block).astype(v.dtype)

    return jax.lax.cond(single_document(layout.q_segment), fused, packed, q, k, v)


def attention(q, k, v, layout: Layout, scale: float, impl: str = "auto", block: int = DEFAULT_BLOCK,
              platform: str = "cpu", self_attention: bool = False) -> jax.Array:
    """The attention core: ``impl`` "naive", "blockwise", "splash", "cudnn", or "auto": for queries or keys
    spanning more than one block, when ``self_attention`` (the layout is a row's own tokens at places 0..T-1, as
    in training and prefill) splash on TPU and cuDNN on GPU for 16-bit inputs, blockwise otherwise; naive within
    one block.
    On CPU low-precision inputs are computed in fp32 (XLA:CPU has no bf16 x bf16 -> fp32 dot for some of these
    shapes, and no fast bf16 one), the output cast back."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    dtype = v.dtype
    long = max(q.shape[1], k.shape[1]) > block
    if impl == "auto" and long and platform == "tpu" and self_attention:
        impl = "splash"
    if impl == "auto" and long and platform == "gpu" and self_attention and dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    if impl == "cudnn":
        if not self_attention:
            raise ValueError("attention impl 'cudnn' needs a row's self-attention layout (training or prefill)")
        return cudnn_attention(q, k, v, layout, scale, block, "cudnn" if platform == "gpu" else "xla")
    if impl == "splash":
        if not self_attention:
            raise ValueError("attention impl 'splash' needs a row's self-attention layout (training or prefill)")
        return splash_attention(q, k, v, layout.q_segment, layout.k_segment, scale, block,
                                interpret=platform != "tpu")
    if platform == "cpu" and dtype != jnp.float32:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if impl == "naive" or (impl == "auto" and not long):
        return naive_attention(q, k, v, layout, scale).astype(dtype)
    return blockwise_attention(q, k, v, layout, scale, block, block).astype(dtype)
