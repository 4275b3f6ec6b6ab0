"""The latent KV cache of absorbed-MLA decoding (REFERENCE.md section 1): a plain pytree.

Per layer and token it holds only ``c_kv`` (after ``kv_a_layernorm``, ``kv_lora_rank`` values) and ``k_pe``
(after rope, in our interleaved layout, ``qk_rope_head_dim`` values): 576 values for V3, against
``2 * heads * head_dim`` for a full multi-head cache.

Layout (L layers of one scanned run, B sequences, S slots, R kv_lora_rank, P qk_rope_head_dim)::

    {"main": {run_name: {"c_kv": [L,B,S,R], "k_pe": [L,B,S,P]}},      # one entry per config.layer_runs
     "mtp":  {"mtp_0": {"c_kv": [B,S,R], "k_pe": [B,S,P]}, ...}}      # only when asked for (speculative)

Slot s holds the token at position s of its sequence (prompts are right-padded, so positions are slot
indices). With ``dtype="fp8"`` values are ``float8_e4m3fn`` with one fp32 scale per token and layer
(``c_kv_scale``/``k_pe_scale`` ``[..., B, S]``, amax / 448), dequantized on read.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig

Cache = dict[str, Any]
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
CACHE_DTYPES = ("float32", "bfloat16", "fp8")


def _storage_dtype(dtype: str):
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: expected one of {CACHE_DTYPES}")
    return FP8 if dtype == "fp8" else jnp.dtype(dtype)


def _entry(lead: tuple[int, ...], config: ModelConfig, dtype: str) -> dict[str, jax.Array]:
    store = _storage_dtype(dtype)
    e = {
        "c_kv": jnp.zeros((*lead, config.kv_lora_rank), store),
        "k_pe": jnp.zeros((*lead, config.qk_rope_head_dim), store),
    }
    if dtype == "fp8":
        e["c_kv_scale"] = jnp.ones(lead, jnp.float32)
        e["k_pe_scale"] = jnp.ones(lead, jnp.float32)
    return e


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str = "float32", mtp: bool = False) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (``mtp``: MTP modules' too)."""
    cache: Cache = {"main": {name: _entry((length, batch, max_len), config, dtype)
                             for name, _, length in config.layer_runs}}
    if mtp:
        cache["mtp"] = {f"mtp_{k}": _entry((batch, max_len), config, dtype)
                        for k in range(config.num_nextn_predict_layers)}
    return cache


def cache_bytes_per_token(config: ModelConfig, dtype: str = "bfloat16", mtp: bool = False) -> int:
    """Bytes one token occupies in the cache: ``(R + P) * layers * itemsize`` (+ fp8 scales).

    V3 in bf16: 576 * 61 * 2 = 70,272 bytes.
    """
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
    store = _storage_dtype(dtype)
    per_layer = config.kv_cache_dim * jnp.dtype(store).itemsize + (8 if dtype == "fp8" else 0)
    return per_layer * layers


def cache_nbytes(cache: Cache) -> int:
    """Bytes actually allocated by a cache pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-vector fp8 e4m3 with scale amax / 448 (clipped first: e4m3fn has no infinity)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), 1e-12) / FP8_MAX
    q = jnp.clip(x32 / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def read(entry: dict[str, jax.Array], dtype) -> tuple[jax.Array, jax.Array]:
    """``(c_kv, k_pe)`` of a cache entry (any leading dims) in ``dtype``, dequantized if fp8."""
    if "c_kv_scale" in entry:
        c = entry["c_kv"].astype(jnp.float32) * entry["c_kv_scale"][..., None]
        p = entry["k_pe"].astype(jnp.float32) * entry["k_pe_scale"][..., None]
        return c.astype(dtype), p.astype(dtype)
    return entry["c_kv"].astype(dtype), entry["k_pe"].astype(dtype)


def write(entry: dict[str, jax.Array], c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array) -> dict:
    """Store new tokens' latents at their positions.

    entry leaves ``[*lead, B, S, .]``; c_kv ``[*lead, B, T, R]``, k_pe ``[*lead, B, T, P]``; positions
    ``[B, T]`` (slots past the end are dropped). One scatter per leaf, in place when the cache is donated.
    """
    b, t = positions.shape
    batch_idx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    n_lead = entry["c_kv"].ndim - 3
    where = (slice(None),) * n_lead + (batch_idx, positions)

    def put(dst, src):
        return dst.at[where].set(src.astype(dst.dtype), mode="drop")

    if "c_kv_scale" in entry:
        qc, sc = _quantize(c_kv)
        qp, sp = _quantize(k_pe)
        return {"c_kv": put(entry["c_kv"], qc), "k_pe": put(entry["k_pe"], qp),
                "c_kv_scale": put(entry["c_kv_scale"], sc), "k_pe_scale": put(entry["k_pe_scale"], sp)}
    return {"c_kv": put(entry["c_kv"], c_kv), "k_pe": put(entry["k_pe"], k_pe)}


def cache_shardings(cache: Cache, mesh) -> Cache:
    """Shardings for a cache on ``mesh``: the batch dim over the batch axes (by the logical rules of
    ``sharding.py``), everything else replicated (the latent is shared by all heads, so there is no head dim
    to split over ``tensor``)."""
    from .sharding import logical_sharding

    def one(path, x):
        in_mtp = jax.tree_util.keystr(path).startswith("['mtp']")
        names = ([] if in_mtp else ["layers"]) + ["act_batch", None]  # slots stay whole
        names += [None] * (x.ndim - len(names))
        return logical_sharding(names, x.shape, mesh)

    return jax.tree_util.tree_map_with_path(one, cache)
