"""deepseek_jax.sampling: logit processors against direct numpy definitions, and sampled frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deepseek_jax.sampling import SamplingParams, processed_logits, sample, target_probs

LOGITS = np.array([[2.0, 1.0, 0.5, -0.5, -1.0, 0.0, 3.0, -2.0]], np.float32)
NONE_SEEN = np.zeros_like(LOGITS, bool)


def kept(sp, logits=LOGITS, seen=NONE_SEEN):
    return np.isfinite(np.asarray(processed_logits(jnp.asarray(logits), jnp.asarray(seen), sp)))[0]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_k_top_p_min_p_keep_the_right_tokens():
    order = np.argsort(-LOGITS[0])
    assert set(np.flatnonzero(kept(SamplingParams(temperature=1.0, top_k=3)))) == set(order[:3])
    p = softmax(LOGITS[0])
    for top_p in (0.3, 0.6, 0.9, 0.99):
        # the smallest set of most likely tokens whose mass reaches top_p
        n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
        assert set(np.flatnonzero(kept(SamplingParams(temperature=1.0, top_p=top_p)))) == set(order[:n])
    for min_p in (0.05, 0.2, 0.5):
        want = np.flatnonzero(p >= min_p * p.max())
        assert set(np.flatnonzero(kept(SamplingParams(temperature=1.0, min_p=min_p)))) == set(want)


def test_temperature_and_repetition_penalty():
    seen = np.zeros_like(NONE_SEEN)
    seen[0, [0, 3]] = True
    sp = SamplingParams(temperature=0.5, repetition_penalty=2.0)
    got = np.asarray(processed_logits(jnp.asarray(LOGITS), jnp.asarray(seen), sp))[0]
    want = LOGITS[0].copy()
    want[0] /= 2.0  # positive: divided
    want[3] *= 2.0  # negative: multiplied
    np.testing.assert_allclose(got, want / 0.5, rtol=1e-6)
    greedy = SamplingParams(repetition_penalty=10.0)
    seen2 = np.zeros_like(NONE_SEEN)
    seen2[0, 6] = True
    assert int(sample(jax.random.PRNGKey(0), jnp.asarray(LOGITS), jnp.asarray(seen2), greedy)[0]) == 0


def test_sampled_frequencies_follow_the_processed_distribution():
    sp = SamplingParams(temperature=0.7, top_k=5, top_p=0.95)
    n = 20_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.shape[1]))
    toks = np.asarray(sample(jax.random.PRNGKey(3), logits, jnp.zeros(logits.shape, bool), sp))
    p = np.asarray(target_probs(jnp.asarray(LOGITS), jnp.asarray(NONE_SEEN), sp))[0].astype(np.float64)
    counts = np.bincount(toks, minlength=p.size)
    assert counts[p == 0].sum() == 0
    assert stats.chisquare(counts[p > 0], p[p > 0] / p.sum() * n).pvalue > 1e-3


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0.0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
