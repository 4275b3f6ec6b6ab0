"""The routed experts on one device's rows: sort the token-expert rows by expert, run the grouped GEMM (each row
scaled by its routing weight), sum each token's K results."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from deepseek_jax.moe.grouped import grouped_swiglu


def sort_rows(idx: jax.Array, n_experts: int):
    """The N*K rows sorted by expert: ``order`` (sorted position -> row), per-expert counts, ``rank`` (row ->
    sorted position)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    return order, counts, rank


def combine(y_rows: jax.Array, k: int) -> jax.Array:
    """Each token's K expert outputs ``[N*K, D]`` (already scaled by their routing weights) summed in fp32:
    ``[N, D]``."""
    return y_rows.reshape(-1, k, y_rows.shape[-1]).astype(jnp.float32).sum(1)


def dispatch_local(recipe, x, weights, idx, wg, wu, wd, impl: str, block_size: Optional[int] = None,
                   limit: Optional[float] = None):
    """Every expert on this device: sort the rows, grouped GEMM, combine. x ``[N, D]``, weights / idx ``[N, K]``.
    Each row's routing weight scales its ``[I]`` intermediate inside the grouped GEMM, before the down projection,
    exactly as under expert parallelism (``expert_parallel.py``), so both paths round alike in bf16."""
    k = idx.shape[1]
    order, counts, rank = sort_rows(idx, wg.shape[0])
    y = grouped_swiglu(recipe, x, order // k, counts, wg, wu, wd, impl, block_size,
                       row_scale=weights.reshape(-1)[order].astype(jnp.float32), limit=limit)
    return combine(y[rank], k)
