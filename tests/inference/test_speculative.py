"""MTP speculative decoding (deepseek_jax.inference.generation with speculative=True, sampling.speculative_accept):
greedy output equals plain greedy, and rejection sampling keeps the target distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tiny_inference import PROMPTS, tiny_checkpoint

import deepseek_jax as dsj
from deepseek_jax.inference import generation as gen
from deepseek_jax.inference.sampling import SamplingParams, speculative_accept, target_probs
from deepseek_jax.layers import kv_cache as kvcache

NEW = 16


def echo_mtp(params):
    """Params whose MTP module passes ``hnorm(h)`` straight to the head: it drafts the token the main model
    predicted one position earlier, i.e. it guesses "the next token repeats". Right often enough, on a
    model that repeats itself, to exercise the accept path; wrong the rest of the time."""
    mtp = jax.tree.map(lambda x: x, params["mtp_0"])
    d = mtp["eh_proj"]["kernel"].shape[1]
    mtp["eh_proj"]["kernel"] = jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)], axis=0)
    for norm in ("enorm", "hnorm", "shared_head_norm"):
        mtp[norm]["scale"] = jnp.ones_like(mtp[norm]["scale"])
    block = mtp["block"]
    block["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(block["self_attn"]["o_proj"]["kernel"])
    block["mlp"] = jax.tree.map(jnp.zeros_like, block["mlp"])  # router weights 0 too: outputs are 0
    return {**params, "mtp_0": mtp}


def repeating(params):
    """Make the main model copy its input token (lm_head reads the embedding back) half the time."""
    emb = params["embed_tokens"]["embedding"]  # [V, D]
    head = params["lm_head"]["kernel"]  # [D, V]
    return {**params, "lm_head": {"kernel": head + 0.6 * emb.T / jnp.linalg.norm(emb, axis=1)[None]}}


def chi2_pvalue(counts, probs) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (restricted to where probs > 0)."""
    probs = np.asarray(probs, np.float64)
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts[keep].sum()
    return stats.chisquare(counts[keep], expected).pvalue


@pytest.mark.parametrize("draft", ["mtp", "echo"])
def test_speculative_greedy_equals_plain_greedy(draft):
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    if draft == "echo":
        params = echo_mtp(repeating(params))
    plain = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None)
    spec = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats["drafted"] > 0
    rate = spec.stats["acceptance_rate"]
    if draft == "echo":
        assert spec.stats["accepted"] >= 3 and rate < 1.0  # both the accept and the reject path ran
        assert spec.stats["steps"] < plain.stats["steps"]
    assert spec.stats["accepted"] == round(rate * spec.stats["drafted"])


def test_speculative_accept_keeps_the_target_distribution():
    v, n = 12, 40_000
    kp, kq, kd, ka = jax.random.split(jax.random.PRNGKey(0), 4)
    p = jax.nn.softmax(jax.random.normal(kp, (v,)) * 1.5)
    q = jax.nn.softmax(jax.random.normal(kq, (v,)) * 1.5)
    draft = jax.random.categorical(kd, jnp.log(q), shape=(n,))
    accepted, token = speculative_accept(ka, jnp.broadcast_to(p, (n, v)), jnp.broadcast_to(q, (n, v)), draft)
    counts = np.bincount(np.asarray(token), minlength=v)
    assert chi2_pvalue(counts, p) > 1e-3
    assert chi2_pvalue(counts, q) < 1e-6  # the test can tell p from q
    expected_rate = float(jnp.minimum(p, q).sum())  # P(accept) = sum_x min(p, q)
    assert abs(float(accepted.mean()) - expected_rate) < 0.01


def test_speculative_step_samples_from_the_main_models_distribution():
    """One speculative step of the real model on many copies of one prompt: the emitted token is
    distributed as the main model's (processed) next-token distribution, and the bonus token, given
    an accepted draft, as the main model's distribution one step further."""
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    sp = SamplingParams(temperature=1.6, top_k=12)  # a flat distribution over few tokens: draft often wrong
    prompt, x, n = [5, 17, 300, 2, 9], 44, 2500
    b, t = n, 16
    tokens = np.zeros((b, t), np.int32)
    tokens[:, : len(prompt)] = prompt
    lengths = jnp.full((b,), len(prompt), jnp.int32)
    cache = kvcache.init_cache(config, b, 32, mtp=True)
    seen = jnp.zeros((b, config.vocab_size), jnp.bool_)
    statics = dict(config=config, options=dsj.ModelOptions(), sampling=sp)
    cache, _, seen, h2, t_prev, _ = gen._prefill_sample_jit(params, cache, jnp.asarray(tokens), lengths, seen,
                                                         jax.random.PRNGKey(0), mtp=True, chunk=None,
                                                         **statics)
    x_vec = jnp.full((b,), x, jnp.int32)  # condition on one next token
    cache, state, out, accepted, _ = gen._speculative_step_jit(params, cache, lengths, t_prev, x_vec, h2, seen,
                                                            jax.random.PRNGKey(1), **statics)
    out, accepted = np.asarray(out), np.asarray(accepted)

    forward = jax.jit(lambda p, toks: dsj.Transformer(config).apply({"params": p}, toks))
    ctx = jnp.asarray([prompt + [x]])
    p0 = np.asarray(target_probs(forward(params, ctx)[:, -1], jnp.zeros((1, config.vocab_size), bool), sp))[0]
    counts = np.bincount(out[:, 0], minlength=config.vocab_size)
    support = p0 > 0
    assert counts[~support].sum() == 0
    assert chi2_pvalue(counts, p0) > 1e-3
    assert 0.05 < accepted.mean() < 0.95  # both paths taken

    # Given acceptance of draft d, the bonus follows the main model after [.., x, d]; check the commonest d.
    d = np.bincount(out[accepted, 0]).argmax()
    rows = accepted & (out[:, 0] == d)
    p1 = np.asarray(target_probs(forward(params, jnp.asarray([prompt + [x, int(d)]]))[:, -1],
                                 jnp.zeros((1, config.vocab_size), bool), sp))[0]
    counts1 = np.bincount(out[rows, 1], minlength=config.vocab_size)
    assert rows.sum() > 150
    assert counts1[p1 == 0].sum() == 0
    assert chi2_pvalue(counts1, p1) > 1e-3
    n_next = np.asarray(state[0])
    assert (n_next == len(prompt) + 1 + accepted).all()


@pytest.mark.slow  # compiles the engine's steps
def test_serving_engine_speculates_in_the_batch_with_plain_greedy_tokens():
    """The continuous-batching engine with ``speculative=True``: each step the MTP module drafts a token per slot
    and the main model verifies it, so a slot gains 1 or 2 tokens a step. Greedy requests (short prompts prefilled
    whole, a 40-token one filled in chunks of 16 beside them, 2 slots for 4 requests so that some join mid-way)
    get plain greedy ``generate``'s tokens; both the accept and the reject path ran, and the drafts accepted are
    those of ``generate``'s own speculation (so the MTP state the engine keeps per slot, through the chunked fill
    too, is right: a wrong one would still give the same tokens, but accept fewer drafts)."""
    from deepseek_jax.inference.engine import Engine, Request

    config, params, _, _ = tiny_checkpoint("tiny-v3")
    params = echo_mtp(repeating(params))
    long = [int(t) for t in np.random.default_rng(3).integers(1, config.vocab_size, 40)]
    prompts = PROMPTS + [long]
    ref = [gen.generate(config, params, [p], max_new_tokens=NEW, eos_token_id=None, prefill_chunk=16).tokens[0]
           for p in prompts]
    # generate's own speculation, a prompt at a time: the same drafts from the same MTP state accept the same
    spec = [gen.generate(config, params, [p], max_new_tokens=NEW, eos_token_id=None, prefill_chunk=16,
                         speculative=True).stats for p in prompts]
    engine = Engine(config, params, slots=2, max_len=128, window_min=16, prefill_chunk=16, steps_per_call=3,
                    speculative=True)
    out, fin = {i: [] for i in range(len(prompts))}, {}
    for i, p in enumerate(prompts):
        engine.submit(Request(p, NEW, lambda text, tok, lp, f, i=i: (
            out[i].append(tok) if tok is not None else None, f and fin.setdefault(i, f))))
    for _ in range(100):
        if len(fin) == len(prompts):
            break
        engine.run_once()
    assert fin == {i: "length" for i in range(len(prompts))}
    assert [out[i] for i in range(len(prompts))] == ref
    assert engine.stats["prefill_chunks"] == 3
    assert 3 <= engine.stats["accepted"] < engine.stats["drafted"]
    assert (engine.stats["accepted"], engine.stats["drafted"]) == (sum(st["accepted"] for st in spec),
                                                                   sum(st["drafted"] for st in spec))
    assert engine.stats["generated_tokens"] == len(prompts) * NEW
