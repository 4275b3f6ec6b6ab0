"""deepseek_jax.inference.sampling: logit processors against direct numpy definitions, and sampled frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deepseek_jax.inference.sampling import SamplingParams, processed_logits, sample, target_probs

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


def _expected_distribution(logits, temperature, top_k, top_p, min_p):
    """The sampling distribution written out in numpy, independently of ``processed_logits``: temperature,
    then keep the top-k, then the smallest top set whose mass (sorted cumulative sum) reaches top_p, then
    the tokens with at least min_p times the largest remaining probability; renormalize."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.size, bool)
    keep[order[:top_k]] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    cum = np.cumsum(p[order])
    n_top = int(np.argmax(cum >= top_p)) + 1  # first sorted position where the mass reaches top_p
    keep_p = np.zeros(x.size, bool)
    keep_p[order[:n_top]] = True
    p = np.where(keep_p, p, 0.0)
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 5, 0.95, 0.0), (1.3, 6, 0.8, 0.0),
                                                           (1.0, 8, 0.99, 0.1)])
def test_sampled_frequencies_follow_the_processed_distribution(temperature, top_k, top_p, min_p):
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    n = 20_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.shape[1]))
    toks = np.asarray(sample(jax.random.PRNGKey(3), logits, jnp.zeros(logits.shape, bool), sp))
    p = _expected_distribution(LOGITS[0], temperature, top_k, top_p, min_p)
    assert 1 < (p > 0).sum() < p.size  # the filters cut something and leave a choice
    counts = np.bincount(toks, minlength=p.size)
    assert counts[p == 0].sum() == 0
    assert stats.chisquare(counts[p > 0], p[p > 0] * n).pvalue > 1e-3
    # target_probs (what speculative decoding accepts against) is the same distribution.
    np.testing.assert_allclose(np.asarray(target_probs(jnp.asarray(LOGITS), jnp.asarray(NONE_SEEN), sp))[0], p,
                               atol=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0.0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
