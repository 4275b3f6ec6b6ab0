"""The KV cache of decoding, a plain pytree: MLA's latent (docs/reference.md, section 1) or a dense student's
keys and values. It sits below the models: a decoder block reads its layer's entry and returns what to write.

Per layer and token it holds only ``c_kv`` (after ``kv_a_layernorm``, ``kv_lora_rank`` values) and ``k_pe``
(after rope, in our interleaved layout, ``qk_rope_head_dim`` values): 576 values for V3, against
``2 * heads * head_dim`` for a full multi-head cache.

Layout (L layers of one scanned run, B sequences, S slots, R kv_lora_rank, P qk_rope_head_dim)::

    {"main": {run_name: {"c_kv": [L,B,S,R], "k_pe": [L,B,S,P]}},      # one entry per config.layer_runs
                                                                    # (V3.2: also "index_k" [L,B,S,Di])
     "mtp":  {"mtp_0": {"c_kv": [B,S,R], "k_pe": [B,S,P]}, ...}}      # only when asked for (speculative)

Slot s holds the token at position s of its sequence (prompts are right-padded, so positions are slot
indices). With ``dtype="fp8"`` values are e4m3 with one fp32 scale per cached vector (``c_kv_scale`` /
``k_pe_scale`` ``[..., B, S]``; ``quant/blocks.py``'s quantizer), dequantized on read.

DeepSeek-V4 caches per layer a ring of its sliding window's K=V entries, the compressed pool (and CSA's indexer
keys) and the compressors' open windows (the table before ``v4_entry_shapes``); it has no MTP cache.

A dense student (GQA, ``gqa.py``) caches its rotated keys and its values instead, ``{"k": [L,B,S,K,E],
"v": [L,B,S,K,E]}`` per run (K key/value heads of width E; fp8 scales ``[..., B, S, K]``, one per head).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax.config.model import CSA, SWA, ModelConfig
from deepseek_jax.parallel.rules import logical_sharding
from deepseek_jax.quant.blocks import E4M3, dequantize_tiles, quantize_tiles

Cache = dict[str, Any]
CACHE_DTYPES = ("float32", "bfloat16", "fp8")
# the main cache's leaves (not V4's) are [L, B, S, ...] (scales [L, B, S] or [L, B, S, K]): these axes
BATCH_AXIS, SLOT_AXIS = 1, 2
# each part's (batch, slot) axes: the MTP modules' leaves have no layer axis
AXES = {"main": (BATCH_AXIS, SLOT_AXIS), "mtp": (0, 1)}


def _storage_dtype(dtype: str):
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: expected one of {CACHE_DTYPES}")
    return E4M3 if dtype == "fp8" else jnp.dtype(dtype)


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The values cached per token per layer and their shapes: MLA's latent and rope key (and, for V3.2, the
    lightning indexer's key, its small companion), or GQA's k, v."""
    if config.uses_mla:
        shapes = {"c_kv": (config.kv_lora_rank,), "k_pe": (config.qk_rope_head_dim,)}
        if config.has_indexer:
            shapes["index_k"] = (config.index_head_dim,)
        return shapes
    heads = (config.num_key_value_heads, config.attn_head_dim)
    return {"k": heads, "v": heads}


def _names(entry: dict) -> tuple[str, ...]:
    if "c_kv" not in entry:
        return ("k", "v")
    return ("c_kv", "k_pe", "index_k") if "index_k" in entry else ("c_kv", "k_pe")


def _entry(lead: tuple[int, ...], config: ModelConfig, dtype: str) -> dict[str, jax.Array]:
    store = _storage_dtype(dtype)
    e = {name: jnp.zeros((*lead, *shape), store) for name, shape in _shapes(config).items()}
    if dtype == "fp8":
        for name, shape in _shapes(config).items():
            e[name + "_scale"] = jnp.ones((*lead, *shape[:-1]), jnp.float32)
    return e


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str = "float32", mtp: bool = False) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (``mtp``: MTP modules' too)."""
    if config.is_v4:
        if mtp:
            raise ValueError("DeepSeek-V4 has no MTP module here: no MTP cache (speculative decoding is not "
                             "available for V4)")
        return {"main": {name: _v4_entry(config, config.layer_types[first], (length, batch), max_len, dtype)
                         for name, first, length in config.layer_runs}}
    cache: Cache = {"main": {name: _entry((length, batch, max_len), config, dtype)
                             for name, _, length in config.layer_runs}}
    if mtp:
        cache["mtp"] = {f"mtp_{k}": _entry((batch, max_len), config, dtype)
                        for k in range(config.num_nextn_predict_layers)}
    return cache


def window(entries: dict, length: int) -> dict:
    """The main cache's runs (``init_cache(...)["main"]``, not V4's) cut to their first ``length`` slots: all a
    decode step reads when every sequence's position is below ``length`` (the slots past it hold nothing the
    step could see)."""
    return jax.tree.map(lambda x: jax.lax.slice_in_dim(x, 0, length, axis=SLOT_AXIS), entries)


def cache_bytes_per_token(config: ModelConfig, dtype: str = "bfloat16", mtp: bool = False) -> int:
    """Bytes one token occupies in the cache: ``(R + P) * layers * itemsize`` (V3.2: ``R + P + Di``; + fp8
    scales, one fp32 per cached vector); a dense student's ``2 * K * E * layers * itemsize``.

    V3 in bf16: 576 * 61 * 2 = 70,272 bytes; V3.2: (576 + 128) * 61 * 2 = 85,888.
    """
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
    store = _storage_dtype(dtype)
    scales = 4 * len(_shapes(config)) if config.uses_mla else 8 * config.num_key_value_heads
    values = sum(math.prod(shape) for shape in _shapes(config).values())
    per_layer = values * jnp.dtype(store).itemsize + (scales if dtype == "fp8" else 0)
    return per_layer * layers


# ----- DeepSeek-V4 -------------------------------------------------------------------------------------------
# A V4 layer's entry (L layers of one run, B sequences; d = head_dim, Di = index_head_dim, r = the kind's rate):
#   "window"      [L,B,W,d]      the last W = sliding_window K=V entries, a ring: slot = position % W
#   "pool"        [L,B,S//r,d]   compressed entries (CSA / HCA layers): slot w pools the window ending at w*r + r-1
#   "kv_state", "gate_state"     [L,B,n,F] fp32: the compressor's projected values and (biased) gates of the last
#                                n tokens, a ring (slot = position % n); n = r and F = d for HCA, n = 2r and F = 2d
#                                for CSA (its windows overlap: entry w reads window w-1's first half)
#   "index_k"     [L,B,S//r,Di]  CSA's indexer keys, pooled like "pool" by its own compressor, whose state is
#   "index_kv_state", "index_gate_state"  [L,B,2r,2Di] fp32.
# fp8 stores "window", "pool" and "index_k" as e4m3 with one fp32 scale per vector; the states stay fp32.
V4_POOLED = ("pool", "index_k")


def v4_entry_shapes(config: ModelConfig, kind: str, max_len: int) -> dict[str, tuple[int, ...]]:
    """Per-sequence shapes of a V4 layer's cache leaves (the table above)."""
    d = config.head_dim
    shapes = {"window": (config.sliding_window, d)}
    if kind == SWA:
        return shapes
    r = config.compress_rate(kind)
    span, width = (2 * r, 2) if kind == CSA else (r, 1)
    shapes.update(pool=(max_len // r, d), kv_state=(span, width * d), gate_state=(span, width * d))
    if kind == CSA:
        di = config.index_head_dim
        shapes.update(index_k=(max_len // r, di), index_kv_state=(span, 2 * di), index_gate_state=(span, 2 * di))
    return shapes


def _v4_entry(config: ModelConfig, kind: str, lead: tuple[int, ...], max_len: int, dtype: str) -> dict:
    store = _storage_dtype(dtype)
    e = {}
    for name, shape in v4_entry_shapes(config, kind, max_len).items():
        e[name] = jnp.zeros((*lead, *shape), jnp.float32 if name.endswith("_state") else store)
        if dtype == "fp8" and not name.endswith("_state"):
            e[name + "_scale"] = jnp.ones((*lead, *shape[:-1]), jnp.float32)
    return e


def read_v4(entry: dict[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """A V4 entry's leaves by name: cached vectors in ``dtype`` (dequantized if fp8), the states in fp32."""
    out = {}
    for name, x in entry.items():
        if name.endswith("_scale"):
            continue
        if name + "_scale" in entry:
            x = dequantize_tiles(x, entry[name + "_scale"][..., None], _vector_tiles(x), dtype)
        out[name] = x if name.endswith("_state") else x.astype(dtype)
    return out


def ring_positions(first: jax.Array, size: int) -> jax.Array:
    """``[B,size]``: the position each slot of a ring (slot = position % size) holds when the positions before
    ``first [B]`` have been written: the latest such position, negative where none is."""
    slots = jnp.arange(size, dtype=jnp.int32)
    return first[:, None] - 1 - jnp.mod(first[:, None] - 1 - slots, size)


def write_v4(entry: dict[str, jax.Array], new: dict[str, jax.Array], positions: jax.Array, valid: jax.Array,
             rate: int) -> dict:
    """Store a V4 layer stack's new values (``new[name] [L,B,T,...]``, one per token) at their slots:
    rings (``window``, the states) at ``position % size``, only the last ``size`` valid tokens of each row (so no
    slot is written twice); pooled leaves (``pool``, ``index_k``) at ``position // rate`` for the tokens that end a
    window (``position % rate == rate - 1``), whose values are the finished entries. ``positions`` / ``valid``
    ``[B,T]`` (invalid tokens, e.g. prompt padding, write nothing). In place when the cache is donated."""
    b, t = positions.shape
    batch_idx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    out = dict(entry)
    for name, x in new.items():
        dst = entry[name]
        size = dst.shape[2]
        if name in V4_POOLED:
            keep = valid & (jnp.mod(positions, rate) == rate - 1)
            slot = jnp.where(keep, positions // rate, size)
        else:
            keep = valid & (positions > last - size)
            slot = jnp.where(keep, jnp.mod(positions, size), size)
        where = (slice(None), batch_idx, slot)  # size: out of range, dropped
        if name + "_scale" in entry:
            x, scale = quantize_tiles(x, _vector_tiles(x))
            out[name + "_scale"] = entry[name + "_scale"].at[where].set(scale[..., 0], mode="drop")
        out[name] = dst.at[where].set(x.astype(dst.dtype), mode="drop")
    return out


def v4_cache_bytes(config: ModelConfig, length: int, dtype: str = "bfloat16") -> dict[str, int]:
    """Bytes of DeepSeek-V4's cache for one sequence of ``length`` tokens (what ``init_cache`` allocates), summed
    over the layers, by part: ``window`` (every layer's ring of ``sliding_window`` K=V entries), ``pool`` (the
    compressed entries, ``length // rate`` per CSA / HCA layer), ``index`` (CSA's indexer keys, as many), and
    ``state`` (the compressors' open windows, fp32: a fixed size). ``dtype`` is the cached vectors' (fp8 adds one
    fp32 scale per vector)."""
    item = jnp.dtype(_storage_dtype(dtype)).itemsize
    part = {"window": "window", "pool": "pool", "index_k": "index"}
    out = {"window": 0, "pool": 0, "index": 0, "state": 0}
    for kind in config.layer_types:
        for name, shape in v4_entry_shapes(config, kind, length).items():
            if name.endswith("_state"):
                out["state"] += math.prod(shape) * 4
            else:
                out[part[name]] += math.prod(shape) * item + (math.prod(shape[:-1]) * 4 if dtype == "fp8" else 0)
    return out


def cache_nbytes(cache: Cache) -> int:
    """Bytes actually allocated by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def _vector_tiles(x: jax.Array) -> tuple[int, ...]:
    """One tile per cached vector: its last dim whole."""
    return (1,) * (x.ndim - 1) + (x.shape[-1],)


def read(entry: dict[str, jax.Array], dtype) -> tuple[jax.Array, ...]:
    """The entry's cached arrays (MLA: ``c_kv, k_pe`` and V3.2's ``index_k``; GQA: ``k, v``; any leading dims)
    in ``dtype``, dequantized if fp8."""
    out = []
    for name in _names(entry):
        x = entry[name]
        if name + "_scale" in entry:
            x = dequantize_tiles(x, entry[name + "_scale"][..., None], _vector_tiles(x), dtype)
        out.append(x.astype(dtype))
    return tuple(out)


def pages(entries: dict, rows: jax.Array, slots: jax.Array) -> dict:
    """The main cache's runs (``init_cache(...)["main"]``, not V4's; leaves ``[L,B,S,...]``) read as a ragged
    step's work list (``layout.PagedLayout``): leaves ``[L,N,G,...]``, item i holding row ``rows[i]``'s
    ``slots[i] [G]``. One gather per leaf over every layer, before the layer scan (which would otherwise slice
    each layer's whole ``[B,S,...]`` entry); fp8 values keep their scales, for ``read`` to dequantize only the
    pages read."""
    return jax.tree.map(lambda x: x[:, rows[:, None], slots], entries)


def write(entry: dict[str, jax.Array], new: tuple[jax.Array, ...], positions: jax.Array) -> dict:
    """Store the new tokens' cached arrays (``read``'s order) at their positions.

    entry leaves ``[*lead, B, S, ...]``; new: MLA's c_kv ``[*lead, B, T, R]`` and k_pe ``[*lead, B, T, P]``, or
    GQA's k, v ``[*lead, B, T, K, E]``; positions ``[B, T]`` (slots past the end are dropped). One scatter per
    leaf, in place when the cache is donated.
    """
    b, t = positions.shape
    batch_idx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    names = _names(entry)
    first = names[0]
    per_token = 1 if first == "c_kv" else 2  # [R] or [K, E]
    n_lead = entry[first].ndim - 2 - per_token  # dims before [B, S]
    where = (slice(None),) * n_lead + (batch_idx, positions)

    def put(dst, src):
        return dst.at[where].set(src.astype(dst.dtype), mode="drop")

    out = {}
    if len(new) != len(names):
        raise ValueError(f"{len(new)} arrays to write into a cache entry of {names}")
    for name, x in zip(names, new):
        if name + "_scale" in entry:
            x, scale = quantize_tiles(x, _vector_tiles(x))
            out[name + "_scale"] = put(entry[name + "_scale"], scale[..., 0])
        out[name] = put(entry[name], x)
    return out


def cache_shardings(cache: Cache, mesh) -> Cache:
    """Shardings for a cache on ``mesh``: the batch dim over the batch axes (by the logical rules of
    ``parallel/rules.py``), everything else replicated (the latent is shared by all heads, so there is no head
    dim to split over ``tensor``)."""
    def one(path, x):
        in_mtp = jax.tree_util.keystr(path).startswith("['mtp']")
        names = ([] if in_mtp else ["layers"]) + ["act_batch", None]  # slots stay whole
        names += [None] * (x.ndim - len(names))
        return logical_sharding(names, x.shape, mesh)

    return jax.tree_util.tree_map_with_path(one, cache)
