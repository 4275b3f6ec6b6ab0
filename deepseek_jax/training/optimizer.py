"""AdamW with warmup + cosine decay, global-norm clipping, no weight decay on norms and biases, the router's
correction bias frozen (it is updated by the balancing rule, not by the optimizer), optional bf16 moments, and
parameters frozen by glob patterns over their paths (fine-tuning part of a model)."""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config.model import FP32_LEAVES


class ScaleByAdamLowPrecisionState(NamedTuple):
    count: jax.Array
    mu: optax.Params
    nu: optax.Params


def scale_by_adam_low_precision(b1=0.9, b2=0.95, eps=1e-8, moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Adam with both moments stored in ``moment_dtype`` (DeepSeek-V3 keeps AdamW moments in bf16) and the
    update computed in fp32."""

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype), params)
        return ScaleByAdamLowPrecisionState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, updates)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(moment_dtype), t)  # noqa: E731
        return out, ScaleByAdamLowPrecisionState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params):
    """Weight decay on matrices only: kernels, embeddings, expert weights; not norms or biases."""
    return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and _leaf_name(p) not in FROZEN
                                            and _leaf_name(p) != "scale", params)


# Leaves no gradient step touches: the router's correction bias (set by the balancing rule) and V4's token ->
# experts table of the hash-routed layers (fixed).
FROZEN = FP32_LEAVES


def frozen_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: _leaf_name(p) in FROZEN, params)


def param_path(path) -> str:
    """A leaf's path in the params tree, '/'-joined: ``moe_layers/mlp/experts/gate_proj``."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_by_patterns(params, train_only: Sequence[str] = (), freeze: Sequence[str] = ()):
    """Per leaf, whether fine-tuning updates it: its ``param_path`` matches one of the ``train_only`` globs
    (every leaf when there are none) and none of the ``freeze`` globs (``fnmatch``: ``*`` also crosses '/').
    A pattern that matches no leaf is an error (most likely a typo), naming a few real paths."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for flag, patterns in (("--train-only", train_only), ("--freeze", freeze)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(p, pat) for p in paths):
                raise ValueError(f"{flag} {pat!r} matches no parameter; the {len(paths)} paths look like "
                                 f"{', '.join(repr(p) for p in paths[:4])}")

    def one(path, _):
        name = param_path(path)
        selected = not train_only or any(fnmatch.fnmatchcase(name, pat) for pat in train_only)
        return selected and not any(fnmatch.fnmatchcase(name, pat) for pat in freeze)

    return jax.tree_util.tree_map_with_path(one, params)


MUON_BETA = 0.95  # Muon's momentum (Nesterov), as the Muon recipe (Jordan et al. 2024; Liu et al. 2025)
MUON_RMS = 0.2  # each Muon update scaled to AdamW's typical RMS: the same learning rate and weight decay serve both


def muon_dimension_numbers(config, params) -> dict:
    """Per leaf of ``params``, Muon's ``MuonDimensionNumbers`` (the matrix it orthogonalizes: the kernel's input
    dims against its output dims, the stacked layer and expert dims batched) for the hidden linear weights, None
    for the rest: the embedding, the output head, the routers' gates (kept fp32 and out of the matmul recipe),
    norms, biases, sinks and every leaf that is not a linear weight. Read off the checkpoint mapping, which knows
    each kernel's input / output split."""
    from optax.contrib import MuonDimensionNumbers

    from deepseek_jax.checkpoint.hf_map import hf_tensor_map, split_point

    dims = {}
    for tm in hf_tensor_map(config):
        if not tm.transpose or tm.path[0] in ("embed_tokens", "lm_head") or tm.path[-2:] == ("gate", "kernel"):
            continue
        lead, n_in = len(tm.sources[0][1]), split_point(tm)
        rank = len(tm.shape)
        dims[tm.path] = MuonDimensionNumbers(tuple(range(lead, lead + n_in)), tuple(range(lead + n_in, rank)))
    return jax.tree_util.tree_map_with_path(
        lambda path, _: dims.get(tuple(str(getattr(k, "key", k)) for k in path)), params)


def muon_or_adam(muon_dims: dict, adam: optax.GradientTransformation) -> optax.GradientTransformation:
    """Muon's direction (Nesterov momentum, 5 Newton-Schulz steps of optax's quintic, RMS matched to AdamW's) on
    the leaves ``muon_dims`` names, ``adam`` on the others; learning rate and weight decay are applied after."""
    from optax.contrib import MuonDimensionNumbers, scale_by_muon

    def is_leaf(x):
        return x is None or isinstance(x, MuonDimensionNumbers)

    def labels(params):
        return jax.tree.map(lambda d, _: "adam" if d is None else "muon", muon_dims, params, is_leaf=is_leaf)

    def masked_dims(params):  # the muon branch sees the other leaves as optax's MaskedNode
        return jax.tree.map(lambda d, _: optax.MaskedNode() if d is None else d, muon_dims, params, is_leaf=is_leaf)

    def rms_scale(updates, dims):  # the orthogonalized update's RMS is about 1 / sqrt(max(fan_in, fan_out))
        if isinstance(dims, optax.MaskedNode) or isinstance(updates, optax.MaskedNode):
            return updates
        fan_in = math.prod(updates.shape[a] for a in dims.reduction_axis)
        fan_out = math.prod(updates.shape[a] for a in dims.output_axis)
        return updates * (MUON_RMS * math.sqrt(max(fan_in, fan_out)))

    def scale_update(updates, state, params=None):
        dims = masked_dims(updates)
        return jax.tree.map(rms_scale, updates, dims, is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state

    muon = optax.chain(scale_by_muon(beta=MUON_BETA, weight_dimension_numbers=masked_dims),
                       optax.GradientTransformation(lambda _: optax.EmptyState(), scale_update))
    return optax.partition({"muon": muon, "adam": adam}, labels)


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup from 0 over ``warmup_steps`` steps, then cosine decay to ``lr * min_ratio`` at
    ``total_steps``; with no warmup the first step already takes ``lr``."""
    if warmup_steps <= 0:
        return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=min_ratio)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=lr * min_ratio
    )


def make_optimizer(lr_schedule, *, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
                   bf16_moments=False, trainable: Optional[Callable] = None,
                   muon_dims: Optional[dict] = None) -> optax.GradientTransformation:
    """``trainable``: ``params -> bool tree`` (``trainable_by_patterns``); the other leaves get exactly zero
    updates and no optimizer state (no moments: LoRA's state is the adapters'), and their gradients count
    neither in the clipping norm nor anywhere else.

    ``muon_dims`` (``muon_dimension_numbers``): Muon for the leaves it gives dimension numbers (the hidden
    linear weights), AdamW for the rest (None leaves); without it, AdamW everywhere. Weight decay, the learning
    rate and the frozen leaves are shared by both."""
    adam = scale_by_adam_low_precision(b1, b2, eps) if bf16_moments else optax.scale_by_adam(b1, b2, eps)
    if muon_dims is not None:
        adam = muon_or_adam(muon_dims, adam)
    parts = [
        adam,
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule),
        optax.masked(optax.set_to_zero(), frozen_mask),
    ]
    if clip_norm:
        parts.insert(0, optax.clip_by_global_norm(clip_norm))
    if trainable is None:
        return optax.chain(*parts)

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))

    return optax.partition({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)
