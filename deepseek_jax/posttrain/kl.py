"""Distillation's losses: forward and reverse KL between the teacher's and the student's next-token distributions
at a temperature, over the full vocabulary or the teacher's top-k ids plus one bucket for the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
