"""The DeepSeekMoE router (docs/reference.md, section 2): per-expert scores, group-limited top-k and the combine
weights; the aux-loss-free correction bias shifts the choice, never the weights.

N tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import MatmulRecipe
from deepseek_jax.ops import contract_last
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import token_split


def router_scores(logits: jax.Array, scoring_func: str) -> jax.Array:
    """Per-expert affinities in fp32: softmax (V2), sigmoid (V3) or ``sqrt(softplus)`` (V4)."""
    logits = logits.astype(jnp.float32)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if scoring_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    return jax.nn.sigmoid(logits)


def _group_mask(choice: jax.Array, config: ModelConfig) -> jax.Array:
    """``[..., E]`` True for experts in the ``topk_group`` best groups.

    A group is scored by its best expert (V2 ``group_limited_greedy``) or by the sum of its best two
    (V3 ``noaux_tc``, computed on the bias-corrected scores).
    """
    *lead, e = choice.shape
    grouped = choice.reshape(*lead, config.n_group, e // config.n_group)
    if config.topk_method == "noaux_tc":
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
        group_scores = grouped.max(-1)
    _, top_groups = jax.lax.top_k(group_scores, config.topk_group)
    keep = jax.nn.one_hot(top_groups, config.n_group, dtype=jnp.bool_).any(axis=-2)  # [..., G]
    return jnp.repeat(keep, e // config.n_group, axis=-1)


def select_experts(scores: jax.Array, bias: jax.Array | None, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Top-K experts per token and their combine weights.

    scores ``[..., E]`` fp32 from ``router_scores``; bias ``[E]`` (``noaux_tc`` only) shifts which experts are
    chosen but never the weights, which are gathered from the unbiased scores, optionally renormalized over
    the K chosen (``norm_topk_prob``, +1e-20 as the reference), then times ``routed_scaling_factor``.
    Sigmoid (and V4's sqrtsoftplus) routers renormalize for any K (V3's code and transformers do, so top-1 gets
    weight 1); softmax routers only for K > 1, as DeepSeek's V2 code does.
    Returns weights ``[..., K]`` fp32 and expert ids ``[..., K]`` int32.
    """
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if config.topk_method in ("group_limited_greedy", "noaux_tc") and config.n_group > 1:
        choice = jnp.where(_group_mask(choice, config), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, config.num_experts_per_tok)
    return _combine_weights(scores, idx, config)


def _combine_weights(scores: jax.Array, idx: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if config.norm_topk_prob and (config.num_experts_per_tok > 1 or config.scoring_func != "softmax"):
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * config.routed_scaling_factor, idx.astype(jnp.int32)


def _select_per_shard(scores: jax.Array, bias: Optional[jax.Array], config: ModelConfig):
    """``select_experts`` on scores ``[B, T, E]``, under a mesh run per device on its own tokens (``shard_map``
    over the batch and context axes the tokens are split over; the bias ``[E]`` is replicated, E floats).

    Routing is per token, so no device needs another's scores. Left to GSPMD, XLA:CPU's partitioner does not
    split ``top_k`` over its batch dims: it all-gathered every token's scores ``[B, T, E]`` (and the grouped
    ``[B, T, G, E / G]``) in each MoE layer and pass, and with them the choices. (The TPU compiler splits
    ``top_k`` itself; this way the step's routing is per shard on every backend, and the CPU HLO, which the
    tests read, says what a TPU runs.)"""
    mesh = current_mesh()
    if mesh is None or getattr(mesh, "manual_axes", ()) or scores.ndim != 3:
        return select_experts(scores, bias, config)
    batch, ctx = token_split(mesh, *scores.shape[:2])
    spec = P(batch or None, ctx or None, None)
    if bias is None:
        return jax.shard_map(lambda s: select_experts(s, None, config), mesh=mesh, in_specs=spec,
                             out_specs=(spec, spec))(scores)
    return jax.shard_map(lambda s, v: select_experts(s, v, config), mesh=mesh, in_specs=(spec, P()),
                         out_specs=(spec, spec))(scores, bias)


class Router(nn.Module):
    """The gate: fp32 logits (kept out of the matmul recipe), scores, and the aux-loss-free bias.

    Takes the tokens ``[B, T, D]`` (or any leading dims) and returns weights / ids ``[..., K]`` and scores
    ``[..., E]``. Under a mesh the choice runs per device on its own tokens (``_select_per_shard``).

    ``hash_routed`` (DeepSeek-V4's first layers): the experts are a fixed table of the token id, ``tid2eid
    [vocab, K]`` (stored as float32 so that it sits in the params tree; frozen, never decayed); the learned gate
    still gives their weights. ``token_ids`` (the input ids, ``x``'s leading shape) are then required.
    """

    config: ModelConfig
    options: ModelOptions
    hash_routed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, token_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), ("embed", "expert")),
            (x.shape[-1], c.n_routed_experts),
            self.options.params_dtype,
        )
        bias = None
        if self.hash_routed:
            table = self.param("tid2eid", nn.with_logical_partitioning(_hash_table_init(c), ("vocab", None)),
                               (c.vocab_size, c.num_experts_per_tok), jnp.float32)
        elif c.has_correction_bias:
            bias = self.param(
                "e_score_correction_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
                (c.n_routed_experts,),
                jnp.float32,
            )
            # Updated by the balancing rule after each step, never by gradients (DeepSeek-V3 section 2.1.2).
            bias = jax.lax.stop_gradient(bias)
        # MoE gating stays in fp32 under every recipe (DeepSeek-V3 section 3.3.1).
        logits = MatmulRecipe(jnp.float32, platform=self.options.target_platform()).dot_general(
            x, kernel, contract_last(1, x.ndim))
        scores = router_scores(logits, c.scoring_func)
        if self.hash_routed:
            if token_ids is None:
                raise ValueError("a hash-routed MoE layer needs the token ids")
            idx = jnp.take(jax.lax.stop_gradient(table).astype(jnp.int32), token_ids, axis=0)
            weights, idx = _combine_weights(scores, idx, c)
        else:
            weights, idx = _select_per_shard(scores, bias, c)
        # Researchers can read every layer's decisions with apply(..., mutable=["intermediates"]).
        self.sow("intermediates", "routing", {"experts": idx, "weights": weights})
        return weights, idx, scores


def _hash_table_init(config: ModelConfig):
    """A fresh model's token -> experts table: K distinct experts per token id, drawn from the init key."""
    def init(key, shape, dtype):
        choice = jax.random.uniform(key, (shape[0], config.n_routed_experts)).argsort(-1)[:, : shape[1]]
        return choice.astype(dtype)
    return init
