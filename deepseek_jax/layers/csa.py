"""DeepSeek-V4's attention layer (docs/reference.md, V4): query LoRA, one shared K=V head, a sliding window plus
compressed entries (CSA: every ``rate`` = 4 tokens pooled, the lightning indexer picks ``index_topk`` of them;
HCA: every 128 pooled, all visible ones read), a sink per head, and the grouped output projection.

The compressor (``Compressor``) turns the hidden states into pooled entries: per token a value ``C = x W_kv`` and
a gate ``Z = x W_gate + B[j]`` (``B``, ``position_bias``, by place j in the window); entry w is the softmax-over-
the-window (fp32) weighted sum of the window's values, RMS-normed, with rope at position ``w * rate``. CSA's
windows overlap: the features are two series ``[Ca | Cb]`` and entry w pools window w - 1's ``Ca`` with window w's
``Cb`` (2 x rate slots). Entry w is seen by queries at or after the last token of its window.

Rope (interleaved pairs) turns the last ``qk_rope_head_dim`` dims of each head: "compress" rope (its own theta,
YaRN when configured) in CSA / HCA layers, "main" rope in sliding-window-only ones. Since K = V, the attention
output carries the keys' rotation; it is turned back at the query's position before the output projection.

Decoding (``mode`` "decode") reads the layer's cache entry (``layers/kv_cache.py``): the window's ring, the pooled
entries and indexer keys, and the compressors' open windows, from which a new token that ends a window finishes
its entry (``recent``); the new tokens see those entries at once, as in the full pass. Speculative decoding would
need the rings rolled back on a rejected draft; V4 has no MTP module here, so it is not offered.

Shapes: B batch, T tokens, D model width, H heads, Dh head dim, L q_lora_rank, C pool entries.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.model import CSA, SWA, ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.attention.compressed import sink_attention, window_pool_attention
from deepseek_jax.layers.attention.layout import Layout, visible
from deepseek_jax.layers.attention.sparse import indexer_topk, take_rows
from deepseek_jax.layers.kv_cache import ring_positions
from deepseek_jax.layers.linear import Linear, MatmulRecipe, matmul_recipe
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import apply_rope, rope_cos_sin
from deepseek_jax.ops import contract_last


class Ropes(NamedTuple):
    """cos / sin ``[B,T,rope/2]`` of the tokens' positions for the "main" and the "compress" rope."""

    main: tuple
    compress: tuple


def v4_rope_configs(config: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The "main" rope (``rope_theta``, unscaled) and the "compress" rope (``compress_rope_theta``, with
    ``rope_scaling``) as configs for ``rope_cos_sin``."""
    return config.replace(rope_scaling=None), config.replace(rope_theta=config.compress_rope_theta)


def v4_ropes(positions: jax.Array, config: ModelConfig) -> Ropes:
    main, compress = v4_rope_configs(config)
    return Ropes(rope_cos_sin(positions, main), rope_cos_sin(positions, compress))


def rope_tail(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rope (interleaved pairs) on the last ``2 * cos.shape[-1]`` dims of ``x [B,T,H,d]``; the rest unchanged."""
    r = 2 * cos.shape[-1]
    return jnp.concatenate([x[..., :-r], apply_rope(x[..., -r:], cos, sin, interleave=True)], axis=-1)


def unweighted_rms_norm(x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class Pool(NamedTuple):
    """Compressed entries ``[B,C,d]`` with the index ``[B,C]`` of each one's last source token and its segment
    ``[B,C]`` (0 when its window is not within one document, or is padding: seen by no one)."""

    entries: jax.Array
    index: jax.Array
    segment: jax.Array


def window_ends(positions: jax.Array, segment_ids: jax.Array, rate: int) -> tuple[jax.Array, jax.Array]:
    """The rows' complete windows, per document: ``[B, T // rate]`` row indices of the tokens that end one (document
    position ``p % rate == rate - 1``, with the ``rate`` rows before it in the same document at consecutive
    positions), in row order, and which of those slots are real (a row holds at most ``T // rate`` complete
    windows: they are disjoint). Padding (segment 0) ends none."""
    b, t = positions.shape
    n = t // rate
    first = jnp.arange(t) - (rate - 1)
    back = jnp.clip(first, 0, t - 1)
    same = ((first >= 0) & (jnp.take(segment_ids, back, axis=1) == segment_ids)
            & (jnp.take(positions, back, axis=1) == positions - (rate - 1)))
    ends = same & (jnp.mod(positions, rate) == rate - 1) & (segment_ids > 0)
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=n, fill_value=0)[0])(ends).astype(jnp.int32)
    return idx, jnp.arange(n) < ends.sum(1, keepdims=True)


def pool_windows(kv: jax.Array, gate: jax.Array, rate: int, overlap: bool) -> jax.Array:
    """Softmax-gated pooling of complete windows: ``kv`` / ``gate`` ``[B, n * rate, F]`` (gate already biased) ->
    ``[B, n, d]`` (d = F, or F / 2 when ``overlap``: window w - 1's first half with window w's second half)."""
    b, t, f = kv.shape
    n = t // rate
    if n == 0:
        return jnp.zeros((b, 0, f // 2 if overlap else f), kv.dtype)
    kv, gate = kv.reshape(b, n, rate, f), gate.reshape(b, n, rate, f)
    if overlap:
        d = f // 2
        prev_kv = jnp.pad(kv[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)))
        prev_gate = jnp.pad(gate[:, :-1, :, :d], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
        kv = jnp.concatenate([prev_kv, kv[..., d:]], axis=2)
        gate = jnp.concatenate([prev_gate, gate[..., d:]], axis=2)
    w = jax.nn.softmax(gate.astype(jnp.float32), axis=2).astype(kv.dtype)
    return (kv * w).sum(2)


def recent(ring: jax.Array, new: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each new token, the ``n`` tokens ending at it: ``[B,T,n,F]`` from a ring ``[B,n,F]`` (slot = position %
    n, holding the positions before the first new one) and the new tokens' own ``new [B,T,F]`` at consecutive
    ``positions [B,T]``; and ``[B,T,n]`` True where that position exists (>= 0)."""
    n, t = ring.shape[1], positions.shape[1]
    first = positions[:, :1, None]
    q = positions[:, :, None] - (n - 1) + jnp.arange(n, dtype=jnp.int32)  # [B,T,n]
    take = jax.vmap(lambda table, i: table[i])
    rows = jnp.where((q >= first)[..., None], take(new, jnp.clip(q - first, 0, t - 1)), take(ring, jnp.mod(q, n)))
    return rows, q >= 0


class Compressor(nn.Module):
    """Pooled entries of ``head_dim`` (normed, rope applied) from ``x [B,T,D]``, and per token what the cache keeps
    (``new``: ``pool`` [B,T,d] the entry a token's window ends with, meaningful where ``position % rate == rate -
    1``; ``kv_state`` / ``gate_state`` [B,T,F] fp32, its projected values and biased gates).

    Windows follow the tokens' document positions (``positions [B,T]``, restarting at each packed document), so a
    packed document is pooled as it would be alone, wherever it starts in its row; the gate's position bias is by
    place in the window. Over whole rows (``state`` None; ``segment_ids`` separate the documents):
    ``(Pool of up to T // rate entries (window_ends), new)``. Decoding (``state``: the cache's rings ``(kv, gate)``
    ``[B,n,F]``; ``positions`` consecutive): ``(None, new)``, each new token's window read from the ring and the new
    tokens (``recent``)."""

    rate: int
    head_dim: int
    overlap: bool
    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 state: Optional[tuple[jax.Array, jax.Array]] = None):
        c, o, r = self.config, self.options, self.rate
        f = self.head_dim * (2 if self.overlap else 1)
        std = c.initializer_range
        kv = Linear((f,), ("embed", "kv_head"), o, init_std=std, name="kv_proj")(x)
        gate = Linear((f,), ("embed", "kv_head"), o, init_std=std, name="gate_proj")(x)
        bias = self.param("position_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "kv_head")),
                          (r, f), jnp.float32)
        b, t, _ = x.shape
        gate = gate.astype(jnp.float32) + bias[jnp.mod(positions, r)]
        new = {"kv_state": kv.astype(jnp.float32), "gate_state": gate}
        norm = RMSNorm(c.rms_norm_eps, "kv_head", o, name="kv_norm")

        def finish(pooled, starts):
            cos, sin = rope_cos_sin(starts, v4_rope_configs(c)[1])
            return rope_tail(norm(pooled)[:, :, None], cos, sin)[:, :, 0]

        if state is None:
            return self._whole_rows(kv, gate, positions, segment_ids, finish, new)
        kv_rows, exists = recent(state[0], new["kv_state"], positions)
        gate_rows, _ = recent(state[1], gate, positions)
        span = kv_rows.shape[2]
        kv_rows = jnp.where(exists[..., None], kv_rows, 0.0).astype(kv.dtype).reshape(b * t, span, f)
        gate_rows = jnp.where(exists[..., None], gate_rows, -jnp.inf).reshape(b * t, span, f)
        pooled = pool_windows(kv_rows, gate_rows, r, self.overlap)[:, -1].reshape(b, t, f // (span // r))
        new["pool"] = finish(pooled, positions // r * r)
        return None, new

    def _whole_rows(self, kv, gate, positions, segment_ids, finish, new):
        """Every complete window of every document in the rows (``window_ends``), each pooled from its own tokens
        (and, CSA, its document's previous window: none for the first) and roped at its document position."""
        r, span = self.rate, self.rate * (2 if self.overlap else 1)
        b, t, f = kv.shape
        ends, real = window_ends(positions, segment_ids, r)  # [B, n]
        n = ends.shape[1]
        rows = ends[..., None] - (span - 1) + jnp.arange(span, dtype=jnp.int32)  # [B, n, span]
        take = jax.vmap(lambda table, i: table[i])
        end_pos = jnp.take_along_axis(positions, ends, axis=1)
        exists = (end_pos[..., None] - (span - 1) + jnp.arange(span, dtype=jnp.int32)) >= 0  # its document's
        kv_rows = jnp.where(exists[..., None], take(kv, jnp.clip(rows, 0, t - 1)), 0).reshape(b * n, span, f)
        gate_rows = jnp.where(exists[..., None], take(gate, jnp.clip(rows, 0, t - 1)), -jnp.inf).reshape(b * n,
                                                                                                       span, f)
        pooled = pool_windows(kv_rows, gate_rows, r, self.overlap)[:, -1].reshape(b, n, f // (span // r))
        entries = finish(pooled, end_pos - (r - 1))
        segment = jnp.where(real, jnp.take_along_axis(segment_ids, ends, axis=1), 0)
        # Per token for the cache: each entry at the token that ends its window.
        laid = jnp.zeros((b, t, entries.shape[-1]), entries.dtype)
        new["pool"] = laid.at[jnp.arange(b)[:, None], jnp.where(real, ends, t)].set(entries, mode="drop")
        return Pool(entries, ends, segment), new


def decode_pool_layout(positions: jax.Array, cached: int, rate: int) -> Layout:
    """Who sees which pool entry when new tokens at ``positions [B,T]`` decode: the ``cached`` slots (slot w ends
    at ``w * rate + rate - 1``; written when that is before the first new token), then one candidate per new token
    (an entry where the token ends a window). Keys' index: the entry's last source token."""
    b = positions.shape[0]
    ends = jnp.broadcast_to(jnp.arange(cached, dtype=jnp.int32) * rate + rate - 1, (b, cached))
    k_index = jnp.concatenate([ends, positions], axis=1)
    k_segment = jnp.concatenate([ends < positions[:, :1], jnp.mod(positions, rate) == rate - 1], axis=1)
    return Layout(positions, jnp.ones_like(positions), k_index, k_segment.astype(jnp.int32))


class Indexer(nn.Module):
    """CSA's lightning indexer: its own overlapping compressor at ``index_head_dim``, queries from the query
    latent (``q_b_proj``, compress rope on their last dims), head weights ``weights_proj`` (fp32, times
    ``Hi ** -0.5``); each query keeps its ``index_topk`` best visible entries by
    ``sum_h w_h ReLU(q_h . k) / sqrt(Di)``. Returns the picks ``(idx, valid)`` ``[B,T,K]`` and the cache's new
    values (``index_k``, ``index_kv_state``, ``index_gate_state``). Decoding (``cache``: the layer's entry), the
    picks index the cached keys then the new tokens' (``decode_pool_layout``)."""

    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, x, q_latent, cos, sin, layout: Layout, segment_ids, positions, cache=None):
        c, o = self.config, self.options
        hi, di, std, rate = c.index_n_heads, c.index_head_dim, c.initializer_range, c.compress_rate(CSA)
        compressor = Compressor(rate, di, True, c, o, name="compressor")
        state = None if cache is None else (cache["index_kv_state"], cache["index_gate_state"])
        keys, new = compressor(x, segment_ids, positions, state)
        new = {"index_k": new["pool"], "index_kv_state": new["kv_state"], "index_gate_state": new["gate_state"]}
        q = Linear((hi, di), ("q_lora", "heads", "qk_head"), o, init_std=std, name="q_b_proj")(q_latent)
        q = rope_tail(q, cos, sin)
        kernel = self.param("weights_proj", nn.with_logical_partitioning(nn.initializers.normal(std),
                                                                         ("embed", "heads")),
                            (x.shape[-1], hi), o.params_dtype)
        w = MatmulRecipe(jnp.float32, platform=o.target_platform()).dot_general(x, kernel, contract_last(1, x.ndim))
        w = w.astype(jnp.float32) * hi ** -0.5
        blocks = dict(q_block=min(o.attention_block, 128), k_block=o.attention_block)
        if cache is not None:
            pool_layout = decode_pool_layout(layout.q_index, cache["index_k"].shape[1], rate)
            return indexer_topk(q, (cache["index_k"], new["index_k"]), w, pool_layout, c.index_topk, di ** -0.5,
                                **blocks), new
        if keys.entries.shape[1] == 0:
            empty = jnp.zeros((*x.shape[:2], 0), jnp.int32)
            return (empty, empty.astype(bool)), new
        pool_layout = Layout(layout.q_index, layout.q_segment, keys.index, keys.segment)
        return indexer_topk(q, keys.entries, w, pool_layout, c.index_topk, di ** -0.5, **blocks), new


def decode_parts(config: ModelConfig, layer_type: str, positions: jax.Array, kv: jax.Array, new: dict, cache: dict,
                 selected) -> list:
    """The keys new tokens at ``positions [B,T]`` read while decoding, as ``sink_attention`` parts: the window's
    ring (``ring_positions``) and the new tokens' own ``kv [B,T,d]`` within ``sliding_window``; for HCA every
    written pool entry and the new tokens' finished ones; for CSA the indexer's picks among those."""
    w = config.sliding_window
    held = ring_positions(positions[:, 0], cache["window"].shape[1])  # [B,W]
    gap = positions[:, :, None] - held[:, None, :]
    step = positions[:, :, None] - positions[:, None, :]
    parts = [(cache["window"], (held >= 0)[:, None, :] & (gap < w)), (kv, (step >= 0) & (step < w))]
    if layer_type == SWA:
        return parts
    tables = (cache["pool"], new["pool"])
    if layer_type == CSA:
        idx, valid = selected
        return parts + [(take_rows(tables, idx), valid)]
    seen = visible(decode_pool_layout(positions, tables[0].shape[1], config.compress_rate(layer_type)))
    c = tables[0].shape[1]
    return parts + [(tables[0], seen[..., :c]), (tables[1], seen[..., c:])]


class CompressedAttention(nn.Module):
    """One V4 attention layer of kind ``layer_type``: ``x [B,T,D]`` (normed) -> ``[B,T,D]``; in ``mode`` "prefill"
    and "decode" also the new tokens' cache values ``{name: [B,T,...]}`` (``kv_cache.write_v4`` stores them).
    "train" and "prefill" run over whole rows (``layout`` over the rows); "decode" reads the layer's cache entry
    (``cache``, ``kv_cache.read_v4``) at the new tokens' positions (``layout.q_index``)."""

    config: ModelConfig
    options: ModelOptions
    layer_type: str
    mode: str = "train"

    @nn.compact
    def __call__(self, x: jax.Array, ropes: Ropes, layout: Layout, segment_ids: jax.Array, positions: jax.Array,
                 cache=None):
        c, o = self.config, self.options
        h, dh, g, std = c.num_attention_heads, c.head_dim, c.o_groups, c.initializer_range
        decoding = self.mode == "decode"
        cos, sin = ropes.main if self.layer_type == SWA else ropes.compress
        q_latent = Linear((c.q_lora_rank,), ("embed", "q_lora"), o, init_std=std, name="q_a_proj")(x)
        q_latent = RMSNorm(c.rms_norm_eps, "q_lora", o, name="q_a_norm")(q_latent)
        q = Linear((h, dh), ("q_lora", "heads", "qk_head"), o, init_std=std, name="q_b_proj")(q_latent)
        q = rope_tail(unweighted_rms_norm(q, c.rms_norm_eps), cos, sin)
        kv = Linear((dh,), ("embed", "kv_head"), o, init_std=std, name="kv_proj")(x)
        kv = RMSNorm(c.rms_norm_eps, "kv_head", o, name="kv_norm")(kv)
        kv = rope_tail(kv[:, :, None], cos, sin)[:, :, 0]
        sinks = self.param("sinks", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (h,),
                           jnp.float32)
        new = {"window": kv}
        pool: Optional[Pool] = None
        selected = None
        if self.layer_type != SWA:
            compressor = Compressor(c.compress_rate(self.layer_type), dh, self.layer_type == CSA, c, o,
                                    name="compressor")
            state = (cache["kv_state"], cache["gate_state"]) if decoding else None
            pool, more = compressor(x, segment_ids, positions, state)
            new.update(more)
            if self.layer_type == CSA:
                selected, more = Indexer(c, o, name="indexer")(x, q_latent, cos, sin, layout, segment_ids,
                                                               positions, cache if decoding else None)
                new.update(more)
        if decoding:
            parts = decode_parts(c, self.layer_type, layout.q_index, kv, new, cache, selected)
            out = sink_attention(q, parts, sinks.astype(jnp.float32), c.softmax_scale)
        else:
            out = window_pool_attention(
                q, kv, sinks, layout.q_index, layout.q_segment, *(pool if pool is not None else (None,) * 3),
                selected=selected, window=c.sliding_window, scale=c.softmax_scale, q_block=o.attention_block)
        out = rope_tail(out, cos, -sin)
        b, t = x.shape[:2]
        grouped = out.reshape(b, t, g, h // g * dh)
        # Kernel [in, G, R] (in = a group's H / G heads x Dh): group g maps its heads to R values.
        wa = self.param("o_a_proj", nn.with_logical_partitioning(nn.initializers.normal(std),
                                                                 ("embed", "heads", None)),
                        (h // g * dh, g, c.o_lora_rank), o.params_dtype)
        mid = matmul_recipe(o).dot_general(grouped, wa, (((3,), (0,)), ((2,), (1,))))  # [G, B, T, R]
        mid = jnp.moveaxis(mid, 0, 2).reshape(b, t, g * c.o_lora_rank)
        out = Linear((x.shape[-1],), ("q_lora", "embed"), o, init_std=std, name="o_b_proj")(mid)
        return out if self.mode == "train" else (out, new)
