"""The routed experts on one device's rows: sort the token-expert rows by expert, run the grouped GEMM, combine each
token's K results with its routing weights."""

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


def combine(y_rows: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum over each token's K expert outputs ``[N*K, D]`` -> ``[N, D]`` in fp32."""
    n, k = weights.shape
    return jnp.einsum("nkd,nk->nd", y_rows.reshape(n, k, -1).astype(jnp.float32), weights)


def dispatch_local(recipe, x, weights, idx, wg, wu, wd, impl: str, block_size: Optional[int] = None):
    """Every expert on this device: sort the rows, grouped GEMM, combine. x ``[N, D]``, weights / idx ``[N, K]``."""
    k = idx.shape[1]
    order, counts, rank = sort_rows(idx, wg.shape[0])
    y = grouped_swiglu(recipe, x, order // k, counts, wg, wu, wd, impl, block_size)
    return combine(y[rank], weights)
