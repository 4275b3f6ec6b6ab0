"""Turning logits into tokens: repetition penalty, temperature, top-k, top-p, min-p; speculative acceptance.

The processors follow the usual order (as transformers applies them): repetition penalty on the raw logits,
then temperature, then top-k, top-p and min-p as masks. ``temperature == 0`` means greedy (argmax of the
penalized logits). Everything here is jittable; ``SamplingParams`` is hashable and passed as a static arg.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off; repetition_penalty 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: expected >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: expected in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p = {self.min_p}: expected in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty = {self.repetition_penalty}: expected > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty (Keskar et al. 2019) on tokens already in the context ``seen [B,V]``: divide positive
    logits by ``penalty``, multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def outside_top_p(x: jax.Array, top_p) -> jax.Array:
    """``[B,V]`` True for the tokens outside the top-p nucleus of softmax(``x``): the nucleus is the smallest set
    of most likely tokens whose mass reaches ``top_p`` (a float, or ``[B]`` per row); it always holds the most
    likely token."""
    probs = jax.nn.softmax(x, axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above
    top_p = jnp.reshape(jnp.asarray(top_p, probs.dtype), (-1, 1))
    threshold = jnp.min(jnp.where(before < top_p, sorted_p, jnp.inf), axis=-1, keepdims=True)
    return probs < threshold


def processed_logits(logits: jax.Array, seen: jax.Array, sp: SamplingParams) -> jax.Array:
    """``[B,V]`` fp32 logits of the distribution sampling draws from (masked entries are -inf)."""
    x = apply_repetition_penalty(logits.astype(jnp.float32), seen, sp.repetition_penalty)
    if sp.greedy:
        return x
    x = x / sp.temperature
    if sp.top_k > 0 and sp.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
        x = jnp.where(x < kth, NEG_INF, x)
    if sp.top_p < 1.0:
        x = jnp.where(outside_top_p(x, sp.top_p), NEG_INF, x)
    if sp.min_p > 0.0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < sp.min_p * probs.max(-1, keepdims=True), NEG_INF, x)
    return x


def probs_of(x: jax.Array, sp: SamplingParams) -> jax.Array:
    """The distribution a token is drawn from, given ``processed_logits`` x: one-hot on the argmax when greedy."""
    if sp.greedy:
        return jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(x, axis=-1)


def target_probs(logits: jax.Array, seen: jax.Array, sp: SamplingParams) -> jax.Array:
    """The distribution a token is drawn from: one-hot on the argmax when greedy."""
    return probs_of(processed_logits(logits, seen, sp), sp)


def logprob_of(x: jax.Array, tokens: jax.Array) -> jax.Array:
    """``[B]`` fp32: log-softmax of ``processed_logits`` x ``[B,V]`` at ``tokens [B]``. Sampled, that is the
    log-probability the token was drawn with (temperature and the masks applied); greedy (x the penalized raw
    logits), the model's own log-probability of its argmax."""
    return jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)[:, 0]


def sample_with_logprob(rng: jax.Array, logits: jax.Array, seen: jax.Array,
                        sp: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` int32 from logits ``[B,V]``, and their log-probabilities ``[B]`` (``logprob_of``)."""
    x = processed_logits(logits, seen, sp)
    if sp.greedy:
        tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    else:
        tokens = jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
    return tokens, logprob_of(x, tokens)


def sample(rng: jax.Array, logits: jax.Array, seen: jax.Array, sp: SamplingParams) -> jax.Array:
    """Next tokens ``[B]`` int32 from logits ``[B,V]``."""
    return sample_with_logprob(rng, logits, seen, sp)[0]


def mark_seen(seen: jax.Array, tokens: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Add ``tokens [B]`` (where ``where [B]`` holds, default everywhere) to the context set ``seen [B,V]``."""
    hit = jax.nn.one_hot(tokens, seen.shape[-1], dtype=jnp.bool_)
    if where is not None:
        hit = hit & where[:, None]
    return seen | hit


def speculative_accept(rng: jax.Array, p: jax.Array, q: jax.Array, draft: jax.Array):
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) of one drafted token per sequence.

    p ``[B,V]`` target probabilities, q ``[B,V]`` the draft's, draft ``[B]`` drawn from q. The draft is kept
    with probability ``min(1, p[d] / q[d])``; otherwise a token is drawn from ``max(p - q, 0)`` normalized.
    The returned token is then distributed exactly as p. With one-hot p and q (greedy) this keeps the draft
    iff it is the target's argmax, and otherwise returns the argmax. Returns ``(accepted [B], token [B])``.
    """
    k_accept, k_resample = jax.random.split(rng)
    pd = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    u = jax.random.uniform(k_accept, pd.shape, jnp.float32)
    accepted = u * qd < pd
    residual = jnp.maximum(p - q, 0.0)
    total = residual.sum(-1, keepdims=True)
    residual = jnp.where(total > 0, residual, p)  # p == q: every draft is accepted anyway
    resampled = jax.random.categorical(k_resample, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(accepted, draft, resampled)
