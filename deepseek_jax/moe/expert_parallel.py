"""Expert parallelism: the routed experts under ``jax.shard_map`` (docs/architecture.md, "Expert parallelism").

The router's choice and statistics run per device in their own ``shard_map``s (``router.py``, ``layer.py``); the
shared experts stay under GSPMD. Every device holds its own tokens (the batch axes split them) and ``E / EP``
experts (the ``expert`` axis splits the expert stacks; ``fsdp`` is gathered once per layer and pass before
entering, as for any FSDP weight, and ``tensor`` splits the expert width, reduced by a ``psum`` at the end). Per
layer, on each device:

1. sort its N*K token-expert rows by expert (so by the device that owns the expert);
2. exchange per-expert counts (a small all-gather over ``expert``): every device learns the layout of what it
   will receive;
3. send the rows to the experts' owners: ``ragged_all_to_all`` where the backend has it (TPU, GPU), else a
   fixed-shape ``all_to_all`` of one slot of ``capacity`` rows per peer (XLA:CPU has no ragged all-to-all);
4. group the received rows by local expert and run the grouped GEMM (``grouped.py``'s ``grouped_swiglu``), each row
   scaled by its routing weight (sent along with the rows, one fp32 number per row);
5. send the results back the same way, in reverse;
6. put them back in token order and sum each token's K results (in fp32).

The routing weights are applied on the experts' side so that the backward pass needs no returned rows: the
combine is a plain sum, and a routing weight's gradient is formed inside the grouped GEMM (the weight scales
the row's ``[I]`` intermediate before the down projection: a dot over I, from a buffer that the GEMM's backward
holds anyway). Under remat the return exchange is then not run again in the backward pass.

Dropless by default: a peer slot holds the worst case (all of a device's rows). With ``capacity_factor`` c a
device sends at most ``ceil(c * rows / EP)`` rows to each peer (``rows``: those of one exchange, see below),
shared max-min fairly among that peer's local experts (``_cap_per_expert``: every expert keeps its rows up to a
common level, the slot's remainder goes one row each to the first experts above it; so counts ``[5, 5, 5, 5]``
at capacity 10 keep ``[3, 3, 2, 2]``, where the first experts used to take everything and the last ones none).
Within an expert the rows kept are its first in token order. A dropped row contributes nothing (its routing
weight is not renormalized, as in GShard and Switch) and is counted, per expert, in the returned ``dropped``.

The worst-case receive buffer of one exchange is EP x (a device's rows). ``exchange_rows`` bounds it: a device's
tokens then go through steps 1-6 in equal chunks (the last padded with tokens that route nowhere), one after
another under ``lax.scan``, each chunk under ``jax.checkpoint`` (its buffers are recomputed in the backward
rather than kept for every chunk). Dropless stays dropless: the worst case is per chunk. With
``keep_received`` (for a layer that is not rematerialized) the chunks keep their received rows for the
backward, so the exchange to the experts does not run again (the grouped GEMM is recomputed from them); in a
rematerialized layer the layer's recomputation would run it anyway, so there nothing is kept.

When the tokens cannot be split over ``expert`` (a decode step with fewer sequences than devices), every device
of an expert group holds the same tokens: each runs only the rows routed to its own experts and a ``psum``
over ``expert`` adds the groups' outputs: no all-to-all, and still each expert weight stays on its device.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.lora import LoraWeight, lora_specs, per_device_dropout
from deepseek_jax.moe.dispatch import combine, dispatch_local, sort_rows
from deepseek_jax.moe.grouped import grouped_swiglu
from deepseek_jax.quant.weights import Fp8Weight

RECEIVED = "expert_parallel_received"  # checkpoint name of the rows (and weights) an exchange receives


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _ep_body(recipe, x, weights, idx, wg, wu, wd, *, expert_axis: str, tensor_axis: Optional[str], n_experts: int,
             impl: str, block_size: Optional[int], capacity: int, ragged: bool, limit: Optional[float] = None):
    """One device's share (see the module docstring). x ``[n, D]``; weights / idx ``[n, K]``; w* ``[E_loc, ...]``.
    Returns the combined output ``[n, D]`` (fp32), the rows this device dropped per expert ``[E]`` and the real
    rows its grouped GEMM ran."""
    n, k = idx.shape
    e_loc = wg.shape[0]
    ep = n_experts // e_loc
    me = jax.lax.axis_index(expert_axis)
    rows = n * k
    peers = jnp.arange(ep, dtype=jnp.int32)

    # 1. This device's rows sorted by expert, so by destination peer; each peer's share capped, fairly over its
    # local experts. Kept rows: the first sent[e] of expert e's run (token order). ``send_order`` lists the kept
    # rows first, peer after peer (the compact layout the exchange sends), then the dropped ones.
    order, counts, rank = sort_rows(idx, n_experts)
    sent = _cap_per_expert(counts.reshape(ep, e_loc), capacity)  # [EP, E_loc]: rows sent per peer's local expert
    send_sizes = sent.sum(1)
    compact_start = _exclusive_cumsum(send_sizes)  # peer j's kept rows in the compact layout
    dropped = counts - sent.reshape(-1)  # [E]; a padded chunk's rows route to expert E: never counted or sent
    pos = jnp.arange(rows, dtype=jnp.int32)
    expert_of = idx.reshape(-1)[order]  # [rows] sorted: E for padding
    run_start = jnp.append(_exclusive_cumsum(counts), counts.sum())
    kept = pos - run_start[expert_of] < jnp.append(sent.reshape(-1), 0)[expert_of]
    send_order = order if capacity >= rows else order[jnp.argsort(~kept, stable=True)]

    # 2. What everyone sends: all_sent[i, j, e] = rows device i sends to device j for j's local expert e.
    all_sent = jax.lax.all_gather(sent, expert_axis)  # [EP(src), EP(dst), E_loc]
    pair = all_sent.sum(2)  # [EP(src), EP(dst)]
    from_peer = all_sent[:, me]  # [EP(src), E_loc]: what this device receives
    recv_sizes = from_peer.sum(1)

    # 3. Rows to the experts' owners. Received chunks: source i's at recv_start[i], sorted by local expert.
    slot = jnp.arange(capacity, dtype=jnp.int32)
    ok = slot[None, :] < send_sizes[:, None]  # [EP, capacity]
    src = jnp.where(ok, compact_start[:, None] + slot[None, :], rows)  # each peer's slot: kept rows, then padding

    def slab_send(a):  # fixed shape: one slot of ``capacity`` rows per peer
        slab = jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)])[src]
        return jax.lax.all_to_all(slab, expert_axis, 0, 0, tiled=True).reshape(ep * capacity, *a.shape[1:])

    xs = x[send_order // k]
    if ragged:
        recv_start = _exclusive_cumsum(recv_sizes)
        dst_offsets = jnp.sum(jnp.where(peers[:, None] < me, pair, 0), axis=0)  # after earlier sources' chunks
        recv = jax.lax.ragged_all_to_all(xs, jnp.zeros((ep * capacity, x.shape[1]), x.dtype), compact_start,
                                         send_sizes, dst_offsets, recv_sizes, axis_name=expert_axis)
    else:
        recv, recv_start = slab_send(xs), peers * capacity
    recv = checkpoint_name(recv, RECEIVED)
    s = jnp.arange(recv.shape[0], dtype=jnp.int32)
    src_of = jnp.clip(jnp.searchsorted(recv_start, s, side="right") - 1, 0, ep - 1).astype(jnp.int32)
    within = s - recv_start[src_of]
    filled = within < recv_sizes[src_of]
    # Their routing weights, one fp32 number per row, always by the fixed-shape exchange: a ragged exchange of
    # [rows, 1] pads each row to a full 128-lane tile on TPU (512 bytes a row), the [EP, capacity] slab does not.
    w_slab = checkpoint_name(slab_send(weights.reshape(-1)[send_order].astype(jnp.float32)), RECEIVED)
    w_recv = jnp.where(filled, w_slab[src_of * capacity + jnp.where(filled, within, 0)], 0.0)

    # 4. Group the received rows by local expert (across sources), run the grouped GEMM, apply the weights.
    local_e = jnp.sum(within[:, None] >= jnp.cumsum(from_peer, axis=1)[src_of], axis=1).astype(jnp.int32)
    local_e = jnp.where(filled, local_e, e_loc)  # e_loc: an empty slot
    by_expert = jnp.argsort(local_e, stable=True).astype(jnp.int32)
    # The weights scale each row's [rows, I] intermediate inside the grouped GEMM (empty slots: weight 0), so the
    # weights' gradient is formed there, from buffers the GEMM's backward holds anyway.
    y = grouped_swiglu(recipe, recv, by_expert, from_peer.sum(0).astype(jnp.int32), wg, wu, wd, impl, block_size,
                       limit=limit,
                       row_scale=w_recv[by_expert])
    y_recv = y[jnp.zeros_like(by_expert).at[by_expert].set(s)]  # back to the received layout
    if tensor_axis is not None:  # the expert width is split over tensor: partial sums
        y_recv = jax.lax.psum(y_recv, tensor_axis)

    # 5. Results back to the rows' owners, into the compact layout (each peer's kept rows, peer after peer).
    if ragged:
        # At the expert owner: source i's results go after i's chunks from the owners before this one.
        back_offsets = jnp.sum(jnp.where(peers[None, :] < me, pair, 0), axis=1)
        back = jax.lax.ragged_all_to_all(y_recv, jnp.zeros((rows, y_recv.shape[1]), y_recv.dtype), recv_start,
                                         recv_sizes, back_offsets, send_sizes, axis_name=expert_axis)
        slot_base = compact_start
    else:
        back = jax.lax.all_to_all(y_recv.reshape(ep, capacity, -1), expert_axis, 0, 0, tiled=True)
        back = back.reshape(ep * capacity, -1)
        slot_base = peers * capacity

    # 6. Sorted order, then token order; dropped rows give 0; each token's K weighted results summed.
    peer = jnp.minimum(expert_of // e_loc, ep - 1)
    slot_in_peer = _exclusive_cumsum(kept.astype(jnp.int32)) - compact_start[peer]  # place among the peer's kept
    y_sorted = jnp.where(kept[:, None], back[jnp.where(kept, slot_base[peer] + slot_in_peer, 0)], 0)
    return combine(y_sorted[rank], k), dropped, from_peer.sum()  # already weighted


def exchange_chunks(tokens: int, k: int, ep: int, exchange_rows: Optional[int]) -> tuple[int, int]:
    """``(chunks, chunk_tokens)``: how a device's ``tokens`` go through the all-to-all. The fewest chunks whose
    worst-case receive buffer, ``ep * k * chunk_tokens`` rows, stays within ``exchange_rows`` (one token per
    chunk at worst), each of ``ceil(tokens / chunks)`` tokens: the last chunk is padded (by fewer than
    ``chunks`` tokens that route nowhere), so any token count takes ``ceil(ep * k * tokens / exchange_rows)``
    chunks or one more, never a divisor hunt (4,078 tokens at 64 rows each and 65,536: 4 chunks, not 2,039)."""
    if exchange_rows is None or ep * k * tokens <= exchange_rows:
        return 1, tokens
    most = max(1, exchange_rows // (ep * k))  # tokens per chunk the buffer allows
    chunks = -(-tokens // most)
    return chunks, -(-tokens // chunks)


def _in_chunks(body, chunks: int, chunk_tokens: int, n_experts: int, keep_received: bool):
    """``body`` (one device's exchange of its tokens) run over ``chunks`` slices of ``chunk_tokens`` tokens in
    turn, each rematerialized in the backward pass (keeping only its received rows with ``keep_received``). The
    tokens are padded to ``chunks * chunk_tokens`` with rows routed to expert ``n_experts`` (none: they are sorted
    after every real row, counted for no expert, so never sent) and weight 0."""
    step = jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(RECEIVED)
                          if keep_received else None)

    def run(x, weights, idx, wg, wu, wd):
        n, pad = x.shape[0], chunks * chunk_tokens - x.shape[0]

        def one(_, part):
            return None, step(*part, wg, wu, wd)

        padded = (jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(weights, ((0, pad), (0, 0))),
                  jnp.pad(idx, ((0, pad), (0, 0)), constant_values=n_experts))
        parts = tuple(a.reshape(chunks, chunk_tokens, *a.shape[1:]) for a in padded)
        _, (y, dropped, rows) = jax.lax.scan(one, None, parts)
        return y.reshape(chunks * chunk_tokens, -1)[:n], dropped.sum(0), rows.sum()

    return run


def _cap_per_expert(per_expert: jax.Array, capacity: int) -> jax.Array:
    """Rows sent per (peer, local expert) ``[EP, E_loc]`` when each peer takes at most ``capacity`` rows, shared
    max-min fairly (water-filling): every expert keeps its rows up to a common level L, the largest with
    ``sum(min(count, L)) <= capacity``; the capacity left over (fewer rows than there are experts above L) goes
    one row each to the first experts above L. ``[[5, 5, 5, 5]]`` at 10 -> ``[[3, 3, 2, 2]]``; ``[[9, 1, 0, 4]]``
    at 10 -> ``[[5, 1, 0, 4]]``."""
    m = per_expert.shape[-1]
    srt = jnp.sort(per_expert, axis=-1)
    smaller = _exclusive_cumsum(srt)  # rows of the experts below the i-th smallest
    need = smaller + srt * (m - jnp.arange(m))  # rows sent at level srt[..., i]: non-decreasing in i
    whole = jnp.sum(need <= capacity, axis=-1, keepdims=True)  # experts kept whole
    served = jnp.take_along_axis(jnp.concatenate([smaller, srt.sum(-1, keepdims=True)], -1), whole, -1)
    fits = whole == m
    level = jnp.where(fits, jnp.iinfo(jnp.int32).max, (capacity - served) // jnp.maximum(m - whole, 1))
    above = per_expert > level
    spare = jnp.where(fits, 0, capacity - served - level * (m - whole))
    return jnp.minimum(per_expert, level) + (above & (jnp.cumsum(above, axis=-1) <= spare))


def _replicated_body(recipe, x, weights, idx, wg, wu, wd, *, expert_axis: str, tensor_axis: Optional[str],
                     n_experts: int, impl: str, block_size: Optional[int], limit: Optional[float] = None):
    """Tokens replicated over ``expert``: each device runs its own experts' rows; psum adds the groups."""
    n, k = idx.shape
    e_loc = wg.shape[0]
    me = jax.lax.axis_index(expert_axis)
    local = idx - me * e_loc
    mine = (local >= 0) & (local < e_loc)
    # Rows of other devices' experts get group e_loc: sorted last, in no group, computed by no one here.
    local = jnp.where(mine, local, e_loc)
    y = dispatch_local(recipe, x, jnp.where(mine, weights, 0.0), local, wg, wu, wd, impl, block_size, limit)
    axes = (expert_axis,) + ((tensor_axis,) if tensor_axis else ())
    return jax.lax.psum(y, axes), jnp.zeros((n_experts,), jnp.int32), mine.sum()


def expert_parallel_dispatch(recipe, x, weights, idx, wg, wu, wd, *, mesh, token_axes: tuple,
                             expert_axis: Optional[str], tensor_axis: Optional[str], impl: str,
                             block_size: Optional[int] = None, capacity_factor: Optional[float] = None,
                             exchange_rows: Optional[int] = None, ragged: bool = False, return_rows: bool = False,
                             keep_received: bool = False, limit: Optional[float] = None):
    """The routed experts of the tokens x ``[N, D]`` (weights / idx ``[N, K]``), one device's share each, under
    ``jax.shard_map`` over ``mesh``.

    ``token_axes``: the mesh axes N is split over, in order (as the activations are: the batch axes that divide
    the sequences, then the context axis). ``expert_axis`` splits the expert stacks (``[E, D, I]`` / ``[E, I, D]``),
    ``tensor_axis`` their width. With ``expert_axis`` among the token axes, rows travel by all-to-all
    (``ragged`` selects ``ragged_all_to_all``), in chunks whose receive buffer stays within ``exchange_rows``;
    otherwise tokens are replicated over it and a ``psum`` combines. ``keep_received``: the chunks keep their
    received rows for the backward pass (for a layer that is not rematerialized; see the module docstring).
    Returns the combined output ``[N, D]`` (fp32) and the rows dropped per expert over the whole batch ``[E]`` (0
    unless ``capacity_factor``); with ``return_rows`` also the real rows each device's grouped GEMM processed (padding
    excluded), one entry per device in mesh order. ``limit``: the experts' SwiGLU clamp (``swiglu_limit``).
    """
    sizes = mesh.shape
    split = tuple(token_axes)
    e = wg.shape[0]
    ep = sizes[expert_axis] if expert_axis in sizes else 1
    if e % ep:
        raise ValueError(f"{e} routed experts do not split over the {ep} devices of mesh axis {expert_axis!r}")
    tensor = tensor_axis if tensor_axis in sizes and sizes[tensor_axis] > 1 else None
    if tensor and wg.shape[2] % sizes[tensor]:
        tensor = None  # the expert width does not split: every tensor device runs the whole expert
    base = wg.base if isinstance(wg, LoraWeight) else wg
    if tensor and isinstance(base, Fp8Weight) and (wg.shape[2] // sizes[tensor]) % max(base.BLOCKS):
        tensor = None  # FP8-kept stacks split on 128-block edges only (FP4: on 32-input groups)
    expert = expert_axis if ep > 1 else None
    rows_per_device = (x.shape[0] // math.prod(sizes[a] for a in split)) * idx.shape[1]
    tok = P(split or None, None)
    w_in = P(expert, None, tensor)
    w_out = P(expert, tensor, None)
    if expert is not None and expert in split:
        k = idx.shape[1]
        chunks, chunk_tokens = exchange_chunks(rows_per_device // k, k, ep, exchange_rows)
        rows_per_chunk = chunk_tokens * k
        capacity = rows_per_chunk if capacity_factor is None else max(
            1, min(rows_per_chunk, math.ceil(capacity_factor * rows_per_chunk / ep)))
        body = partial(_ep_body, recipe, expert_axis=expert, tensor_axis=tensor, n_experts=e, impl=impl,
                       block_size=block_size, capacity=capacity, ragged=ragged, limit=limit)
        if chunks > 1:
            body = _in_chunks(body, chunks, chunk_tokens, e, keep_received)
    elif expert is not None:
        body = partial(_replicated_body, recipe, expert_axis=expert, tensor_axis=tensor, n_experts=e, impl=impl,
                       block_size=block_size, limit=limit)
    else:
        body = partial(_local_body, recipe, tensor_axis=tensor, impl=impl, block_size=block_size, limit=limit)

    def run(x, weights, idx, wg, wu, wd):
        # adapter dropout: a mask per device of the axes that split the rows (not `tensor`, whose devices hold
        # the same rows of gate / up's input)
        rows_axes = tuple(a for a in mesh.axis_names if a != "tensor")
        wg, wu, wd = (per_device_dropout(w, mesh, rows_axes) for w in (wg, wu, wd))
        y, dropped, rows = body(x, weights, idx, wg, wu, wd)
        return y, (jax.lax.psum(dropped, split) if split else dropped), rows.reshape(1)

    # Replication is not type-checked (check_vma off): jax (0.10) types a ragged_all_to_all's result as invariant
    # over the mesh, so with the check on, the result's first use casts it to varying and the backward pass
    # all-reduces the cotangent of every received buffer over the whole mesh (the cast's transpose; 4 all-reduces
    # of a [65,536 x 7,168] buffer per MoE layer in V3's plan). Off, shard_map's transpose sums the inputs'
    # cotangents over the axes their specs leave out (the weights' over fsdp / data / context, as FSDP needs)
    # and nothing else. (The per-device row counts of ``return_rows`` differ across every axis anyway.)
    out_specs = (tok, P()) + ((P(tuple(mesh.axis_names)),) if return_rows else ())
    # An FP8-kept stack ([E, D, I] e4m3 + [E, D/128, I/128] scales; FP4: [E, D / 32, I]): both split alike (on
    # block edges).
    # LoRA adapters (layers/lora.py) split as their stack's dims they share.
    w_specs = tuple(lora_specs(w, spec, lambda base, spec: type(base)(spec, spec, base.n_in, base.n_out)
                               if isinstance(base, Fp8Weight) else spec)
                    for w, spec in ((wg, w_in), (wu, w_in), (wd, w_out)))
    fn = jax.shard_map(lambda *a: run(*a)[:len(out_specs)], mesh=mesh, in_specs=(tok, tok, tok, *w_specs),
                       out_specs=out_specs, check_vma=False)
    return fn(x, weights, idx, wg, wu, wd)


def _local_body(recipe, x, weights, idx, wg, wu, wd, *, tensor_axis: Optional[str], impl: str,
                block_size: Optional[int], limit: Optional[float] = None):
    """Every expert on every device (no expert axis): each device runs its own tokens."""
    y = dispatch_local(recipe, x, weights, idx, wg, wu, wd, impl, block_size, limit)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    return y, jnp.zeros((wg.shape[0],), jnp.int32), jnp.asarray(idx.size, jnp.int32)
