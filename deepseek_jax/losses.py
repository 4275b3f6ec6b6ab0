"""Training losses: next-token CE, MTP, DeepSeek's balance losses, z-loss; and the aux-loss-free bias update.

Router statistics come from ``Transformer.apply(..., return_router_stats=True)``: per MoE layer and sequence,
``counts [L, B, E]`` (tokens that chose each expert) and ``scores [L, B, E]`` (summed per-token normalized
scores ``s / sum(s)``). Token counts per sequence are ``counts.sum(-1) / K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .model import mtp_segment_ids


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token CE in fp32 and the number of counted tokens (mask ``[B, T]`` of 0/1)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return ((lse - picked) * mask).sum(), mask.sum()


def z_loss(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed ``logsumexp(logits)**2`` (keeps the softmax normalizer near 1) and the token count."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    mask = mask.astype(jnp.float32)
    return (lse**2 * mask).sum(), mask.sum()


def mtp_targets(targets: jax.Array, mask: jax.Array, segment_ids: jax.Array, depth: int):
    """Targets and mask for MTP depth k: entry i of depth k predicts ``targets[i + k]``; only where i and i+k
    belong to the same document (packed rows) and that target counts."""
    same_doc = mtp_segment_ids(segment_ids, depth) > 0
    return targets[:, depth:], mask[:, depth:] * same_doc.astype(mask.dtype)


def mtp_loss(mtp_logits: list[jax.Array], targets, mask, segment_ids, weight: float, counts=None):
    """``L_MTP = lambda / D * sum_k CE_k`` (DeepSeek-V3 eq. 25), each CE_k a mean over its counted tokens.

    ``counts``: per depth, the number of counted tokens to divide by (default: this batch's own); the train
    step passes the global batch's, so that micro-batches add up to the big batch's loss.
    """
    if not mtp_logits:
        return jnp.zeros((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for k, logits in enumerate(mtp_logits, start=1):
        tk, mk = mtp_targets(targets, mask, segment_ids, k)
        s, n = cross_entropy(logits, tk, mk)
        total = total + s / jnp.maximum(n if counts is None else counts[k - 1], 1.0)
    return weight / len(mtp_logits) * total


def balance_loss(stats: dict, config: ModelConfig, alpha: float, sequence_wise: bool,
                 num_sequences=None) -> jax.Array:
    """DeepSeek's balance loss ``alpha * sum_i f_i P_i`` per MoE layer, summed over layers.

    ``f_i = E / (K * T) * (tokens choosing i)``, ``P_i = (1/T) * sum_t s'_{i,t}``. Sequence-wise (V3, and V2
    with ``seq_aux``): computed per sequence and averaged over the sequences that hold tokens (``num_sequences``
    of them when given, a scalar or one per layer: the global batch's count under gradient accumulation);
    otherwise (V2 expert-level) over the whole batch.
    """
    if not stats or alpha == 0:
        return jnp.zeros((), jnp.float32)
    counts, scores = stats["counts"], stats["scores"]  # [L, B, E]
    if not sequence_wise:
        counts, scores = counts.sum(1, keepdims=True), scores.sum(1, keepdims=True)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    tokens = jnp.maximum(counts.sum(-1, keepdims=True) / k, 1.0)  # [L, B, 1]
    f = e / (k * tokens) * counts
    p = scores / tokens
    per_seq = (f * p).sum(-1)  # [L, B]
    has_tokens = (counts.sum(-1) > 0).astype(jnp.float32)
    if num_sequences is None or not sequence_wise:
        num_sequences = has_tokens.sum(-1)
    per_layer = (per_seq * has_tokens).sum(-1) / jnp.maximum(num_sequences, 1.0)
    return alpha * per_layer.sum()


def loss_normalizers(batch: dict, mtp_depths: int) -> dict:
    """The counts each loss term divides by, taken from the whole (global) batch: counted tokens, per MTP
    depth its counted tokens, and the sequences holding tokens (main stack and per MTP depth, for the
    sequence-wise balance loss). Each micro-batch's loss divides its sums by these, so the micro-batches add
    up to exactly the big batch's loss and gradient whatever their padding or packing."""
    mask, seg = batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]
    rows = lambda s: (s > 0).any(axis=1).sum().astype(jnp.float32)  # noqa: E731
    depths = range(1, mtp_depths + 1)
    return {
        "tokens": mask.sum(),
        "mtp_tokens": jnp.stack([mtp_targets(batch["targets"], mask, seg, k)[1].sum() for k in depths])
        if mtp_depths else jnp.zeros((0,), jnp.float32),
        "sequences": rows(seg),
        "mtp_sequences": jnp.stack([rows(mtp_segment_ids(seg, k)) for k in depths])
        if mtp_depths else jnp.zeros((0,), jnp.float32),
    }


def update_correction_bias(bias: jax.Array, counts: jax.Array, gamma: float) -> jax.Array:
    """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2), outside the gradient: per layer, ``b_i -= gamma``
    for experts loaded above the layer's mean load and ``+= gamma`` below it.

    bias ``[..., E]``; counts ``[..., E]`` over the whole global batch (sum over sequences and micro-batches).
    """
    load = counts.astype(jnp.float32)
    mean = load.mean(-1, keepdims=True)
    return bias - gamma * jnp.sign(load - mean)


# ----- distillation (teacher -> student) --------------------------------------------------------------
KL_FLOOR = 1e-6  # the smallest tail mass of a top-k distribution (keeps its log finite; see topk_kl)


def kl_divergences(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0):
    """Per token, over the full vocabulary, with ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:
    ``forward = KL(p || q) = sum p (log p - log q)`` and ``reverse = KL(q || p) = sum q (log q - log p)``
    (each ``[B, T]``, fp32)."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    return (p * (log_p - log_q)).sum(-1), (q * (log_q - log_p)).sum(-1)


def teacher_topk(teacher_logits: jax.Array, k: int, temperature: float = 1.0):
    """The teacher's ``k`` most likely ids per token and their log-probabilities ``log softmax(teacher / T)``
    (normalized over the full vocabulary): ``(logp [B, T, k] fp32, ids [B, T, k] int32)``."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    logp, ids = jax.lax.top_k(log_p, k)
    return logp, ids.astype(jnp.int32)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x <= 0``, the mass outside a set from the log of the mass inside, floored at
    ``KL_FLOOR``."""
    return jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(x, 0.0)), KL_FLOOR))


def topk_kl(student_logits: jax.Array, teacher_logp: jax.Array, teacher_ids: jax.Array, temperature: float = 1.0):
    """Forward and reverse KL (each ``[B, T]``) between the teacher's and the student's distributions coarsened to
    ``k + 1`` outcomes: each of the teacher's top-k ids, and "anything else" with the remaining mass. With
    ``k = vocab`` this is the full KL; with fewer ids it is a lower bound of it (coarsening never raises a KL)
    that still charges the student for mass outside the teacher's top k. ``teacher_logp``: log-probabilities at
    temperature ``T`` over the full vocabulary (``teacher_topk``), so a precomputed shard needs no full logits."""
    log_q_all = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jnp.take_along_axis(log_q_all, teacher_ids, axis=-1)
    log_p = teacher_logp.astype(jnp.float32)
    log_p_tail = _log1mexp(jax.nn.logsumexp(log_p, axis=-1))
    log_q_tail = _log1mexp(jax.nn.logsumexp(log_q, axis=-1))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    p_tail, q_tail = jnp.exp(log_p_tail), jnp.exp(log_q_tail)
    forward = (p * (log_p - log_q)).sum(-1) + p_tail * (log_p_tail - log_q_tail)
    reverse = (q * (log_q - log_p)).sum(-1) + q_tail * (log_q_tail - log_p_tail)
    return forward, reverse


def distillation_kl(forward: jax.Array, reverse: jax.Array, mask: jax.Array, mix: float, temperature: float):
    """Summed ``T^2 ((1 - mix) KL(p||q) + mix KL(q||p))`` over the counted tokens, and their number. ``mix`` 0 is
    forward KL (mass-covering, the classic Hinton loss), 1 reverse KL (mode-seeking); ``T^2`` keeps the gradient's
    scale independent of the temperature (Hinton et al. 2015)."""
    mask = mask.astype(jnp.float32)
    per_token = (1.0 - mix) * forward + mix * reverse
    return temperature**2 * (per_token * mask).sum(), mask.sum()


# ----- GRPO (DeepSeekMath / R1; REFERENCE.md section 7) ---------------------------------------------------
GRPO_STD_EPS = 1e-4  # added to the group's std: a group whose rewards are all equal gets zero advantages


def group_advantages(rewards: jax.Array, group_size: int, eps: float = GRPO_STD_EPS) -> jax.Array:
    """``A_i = (r_i - mean r) / (std r + eps)`` within each group of ``group_size`` consecutive samples (the
    samples of one prompt); std is the population std (ddof 0). ``rewards [N]`` -> ``[N]``."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    a = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)
    return a.reshape(-1)


def grpo_token_terms(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
                     clip_eps: float):
    """Per completion token ``[B, T]``: the clipped surrogate ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with
    ``rho = pi / pi_old``, the k3 estimate of ``KL(pi || pi_ref)``: ``pi_ref / pi - log(pi_ref / pi) - 1`` (>= 0,
    unbiased), and whether the clip was active. ``advantages [B]`` (one per sample)."""
    a = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * a, clipped * a)
    log_ref_ratio = ref_logp - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    return surrogate, kl, (ratio * a > clipped * a)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float, beta: float,
              token_level: bool = False, num_samples=None, num_tokens=None):
    """The GRPO loss, ``-objective``, with the objective
    ``mean_i 1/|o_i| sum_t [min(rho A, clip(rho) A) - beta KL]`` over the completion tokens (``mask [B, T]``) of
    each sample, then over the samples (equal groups: the mean of the group means), as REFERENCE.md section 7 and
    DeepSeekMath write it. ``token_level``: one mean over every completion token of the batch instead (DAPO's
    normalization: long completions weigh more). ``num_samples`` / ``num_tokens``: the global batch's counts
    (default this batch's), so micro-batch losses add up to the batch's. Returns ``(loss, metrics)``; metrics are
    the mean k3 KL and clipped fraction per completion token, summable over micro-batches like the loss."""
    mask = mask.astype(jnp.float32)
    surrogate, kl, clipped = grpo_token_terms(logp, old_logp, ref_logp, advantages, clip_eps)
    per_token = (surrogate - beta * kl) * mask
    tokens = mask.sum() if num_tokens is None else num_tokens
    if token_level:
        objective = per_token.sum() / jnp.maximum(tokens, 1.0)
    else:
        samples = (mask.sum(-1) > 0).sum() if num_samples is None else num_samples
        per_sample = per_token.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        objective = per_sample.sum() / jnp.maximum(samples, 1.0)
    n = jnp.maximum(tokens, 1.0)
    return -objective, {"kl": (kl * mask).sum() / n, "clip_fraction": (clipped * mask).sum() / n}
