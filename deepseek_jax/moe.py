"""DeepSeekMoE: router, dropless expert dispatch, shared experts (REFERENCE.md section 2).

N tokens (batch and length flattened), D model width, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .linear import MatmulRecipe, contract_last, matmul_recipe
from .mlp import MLP
from .options import ModelOptions


# ----- routing ------------------------------------------------------------------------------------
def router_scores(logits: jax.Array, scoring_func: str) -> jax.Array:
    """Per-expert affinities in fp32: softmax (V2) or sigmoid (V3)."""
    logits = logits.astype(jnp.float32)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def _group_mask(choice: jax.Array, config: ModelConfig) -> jax.Array:
    """``[N, E]`` True for experts in the ``topk_group`` best groups.

    A group is scored by its best expert (V2 ``group_limited_greedy``) or by the sum of its best two
    (V3 ``noaux_tc``, computed on the bias-corrected scores).
    """
    n, e = choice.shape
    grouped = choice.reshape(n, config.n_group, e // config.n_group)
    if config.topk_method == "noaux_tc":
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        group_scores = grouped.max(-1)
    _, top_groups = jax.lax.top_k(group_scores, config.topk_group)
    keep = jax.nn.one_hot(top_groups, config.n_group, dtype=jnp.bool_).any(axis=1)  # [N, G]
    return jnp.repeat(keep, e // config.n_group, axis=1)


def select_experts(scores: jax.Array, bias: jax.Array | None, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Top-K experts per token and their combine weights.

    scores ``[N, E]`` fp32 from ``router_scores``; bias ``[E]`` (``noaux_tc`` only) shifts which experts are
    chosen but never the weights, which are gathered from the unbiased scores, optionally renormalized over
    the K chosen (``norm_topk_prob``, +1e-20 as the reference), then times ``routed_scaling_factor``.
    Returns weights ``[N, K]`` fp32 and expert ids ``[N, K]`` int32.
    """
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if config.topk_method in ("group_limited_greedy", "noaux_tc") and config.n_group > 1:
        choice = jnp.where(_group_mask(choice, config), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if config.norm_topk_prob and config.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, idx.astype(jnp.int32)


class Router(nn.Module):
    """The gate: fp32 logits (kept out of the matmul recipe), scores, and the aux-loss-free bias."""

    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), ("embed", "expert")),
            (x.shape[-1], c.n_routed_experts),
            self.options.params_dtype,
        )
        bias = None
        if c.has_correction_bias:
            bias = self.param(
                "e_score_correction_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
                (c.n_routed_experts,),
                jnp.float32,
            )
            # Updated by the balancing rule after each step, never by gradients (DeepSeek-V3 section 2.1.2).
            bias = jax.lax.stop_gradient(bias)
        # MoE gating stays in fp32 under every recipe (DeepSeek-V3 section 3.3.1).
        logits = MatmulRecipe(jnp.float32).dot_general(x, kernel, contract_last(1, x.ndim))
        scores = router_scores(logits, c.scoring_func)
        weights, idx = select_experts(scores, bias, c)
        # Researchers can read every layer's decisions with apply(..., mutable=["intermediates"]).
        self.sow("intermediates", "routing", {"experts": idx, "weights": weights})
        return weights, idx, scores


# ----- expert dispatch ----------------------------------------------------------------------------
def _swiglu_expert(recipe: MatmulRecipe, x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> jax.Array:
    """One expert on rows x ``[M, D]`` with weights ``[D, I]``, ``[D, I]``, ``[I, D]``."""
    dims = (((1,), (0,)), ((), ()))
    h = jax.nn.silu(recipe.dot_general(x, wg, dims)) * recipe.dot_general(x, wu, dims)
    return recipe.dot_general(h, wd, dims)


def _sort_by_expert(idx: jax.Array, n_experts: int):
    """The N*K (token, slot) assignments sorted by expert.

    Returns ``order`` (sorted position -> assignment), the sorted experts and tokens, per-expert counts, and
    ``rank`` (assignment -> sorted position), so results can be gathered back per slot without a scatter.
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    counts = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    return order, flat[order], order // k, counts, rank


def _combine(y_slots: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum over each token's K expert outputs ``[N*K, D]`` -> ``[N, D]`` in fp32."""
    n, k = weights.shape
    return jnp.einsum("nkd,nk->nd", y_slots.reshape(n, k, -1).astype(jnp.float32), weights)


def default_block_size(num_assignments: int, n_experts: int) -> int:
    """Rows per block: about the mean rows per expert, a power of two in [8, 256]."""
    mean = max(num_assignments // max(n_experts, 1), 1)
    return int(min(256, max(8, 1 << (mean.bit_length() - 1))))


def dispatch_blocked(recipe, x, weights, idx, wg, wu, wd, block_size: int) -> jax.Array:
    """Dropless, sparse dispatch for any backend.

    The N*K assignments are sorted by expert and each expert's run is padded to a multiple of
    ``block_size``; one scan step computes one block with the one expert that owns it. Work is at most
    ``N*K + E*(block_size-1)`` rows, never E*N. Rows move by gathers only (XLA:CPU scatters are serial).
    """
    n, d = x.shape
    e = wg.shape[0]
    a = idx.size
    m = block_size
    _, sorted_e, sorted_tok, counts, rank = _sort_by_expert(idx, e)
    starts = jnp.cumsum(counts) - counts
    padded = (counts + m - 1) // m * m
    padded_ends = jnp.cumsum(padded)
    dest = (padded_ends - padded)[sorted_e] + (jnp.arange(a, dtype=jnp.int32) - starts[sorted_e])
    n_blocks = (a + e * (m - 1)) // m
    # Which token fills each buffer row; padding rows read an appended zero row.
    row_token = jnp.full((n_blocks * m,), n, jnp.int32).at[dest].set(sorted_tok)
    x_buf = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[row_token]
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(n_blocks, dtype=jnp.int32) * m, side="right"), e - 1
    )

    def one_block(_, inp):
        xb, ex = inp
        return None, _swiglu_expert(recipe, xb, wg[ex], wu[ex], wd[ex])

    _, y_buf = jax.lax.scan(one_block, None, (x_buf.reshape(n_blocks, m, d), block_expert))
    return _combine(y_buf.reshape(n_blocks * m, d)[dest[rank]], weights)


def dispatch_ragged(recipe, x, weights, idx, wg, wu, wd) -> jax.Array:
    """Dropless dispatch with ``jax.lax.ragged_dot`` grouped GEMMs (sparse on GPU/TPU)."""
    _, _, sorted_tok, counts, rank = _sort_by_expert(idx, wg.shape[0])
    xs = x[sorted_tok]
    h = jax.nn.silu(recipe.ragged_dot(xs, wg, counts)) * recipe.ragged_dot(xs, wu, counts)
    return _combine(recipe.ragged_dot(h, wd, counts)[rank], weights)


def dispatch_dense(recipe, x, weights, idx, wg, wu, wd) -> jax.Array:
    """Every expert on every token, combined with the sparse weights: a reference for tests only."""
    e = wg.shape[0]
    dims = (((1,), (1,)), ((), ()))
    h = jax.nn.silu(recipe.dot_general(x, wg, dims)) * recipe.dot_general(x, wu, dims)  # [N, E, I]
    y = recipe.dot_general(h, wd, (((2,), (1,)), ((1,), (0,))))  # [E, N, D]
    combine = (jax.nn.one_hot(idx, e, dtype=jnp.float32) * weights[..., None]).sum(1)  # [N, E]
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)


class Experts(nn.Module):
    """The routed experts' weights, stacked: gate/up ``[E, D, I]``, down ``[E, I, D]``."""

    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        c, o = self.config, self.options
        e, d, i = c.n_routed_experts, x.shape[-1], c.moe_intermediate_size

        def param(name, shape, axes):
            init = nn.initializers.normal(c.initializer_range)
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, o.params_dtype)

        wg = param("gate_proj", (e, d, i), ("expert", "embed", "moe_mlp"))
        wu = param("up_proj", (e, d, i), ("expert", "embed", "moe_mlp"))
        wd = param("down_proj", (e, i, d), ("expert", "moe_mlp", "embed"))
        recipe = matmul_recipe(o)
        mode = o.resolved_moe_dispatch()
        if mode == "blocked":
            m = o.moe_block_size or default_block_size(idx.size, e)
            return dispatch_blocked(recipe, x, weights, idx, wg, wu, wd, m)
        if mode == "ragged":
            return dispatch_ragged(recipe, x, weights, idx, wg, wu, wd)
        return dispatch_dense(recipe, x, weights, idx, wg, wu, wd)


class MoE(nn.Module):
    """Routed experts plus shared experts. Returns the output and this layer's router statistics.

    Statistics (per sequence, padding excluded; what the balance losses and the bias update need):
      ``counts [B, E]``: how many of the sequence's tokens chose each expert (sum over E = K * tokens);
      ``scores [B, E]``: sum over the sequence's tokens of the scores normalized per token, ``s / sum(s)``.
    """

    config: ModelConfig
    options: ModelOptions

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        c, o = self.config, self.options
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, idx, scores = Router(c, o, name="gate")(flat)
        routed = Experts(c, o, name="experts")(flat, weights, idx)
        out = routed.astype(o.compute_dtype).reshape(b, t, d)
        if c.n_shared_experts > 0:
            shared = MLP(c.n_shared_experts * c.moe_intermediate_size, o, c.initializer_range, name="shared_experts")
            out = out + shared(x)
        mask = valid.reshape(b * t, 1).astype(jnp.float32)
        chosen = jax.nn.one_hot(idx, c.n_routed_experts, dtype=jnp.float32).sum(1) * mask
        normed = scores / scores.sum(-1, keepdims=True) * mask
        stats = {
            "counts": chosen.reshape(b, t, -1).sum(1),
            "scores": normed.reshape(b, t, -1).sum(1),
        }
        return out, stats
