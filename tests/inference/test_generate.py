"""deepseek_jax.inference.generation: batched greedy generation against transformers' generate, stop conditions,
streaming, seeded sampling, one compile per request shape."""

import numpy as np
import pytest
import torch
from tiny_inference import PROMPTS, tiny_checkpoint

from deepseek_jax.inference import generation as gen
from deepseek_jax.inference.sampling import SamplingParams

NEW = 12


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2"])
def test_greedy_batch_equals_transformers_generate(name):
    config, params, hf, _ = tiny_checkpoint(name)
    res = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None)
    for prompt, tokens in zip(PROMPTS, res.tokens):
        assert tokens == hf_greedy(hf, prompt, NEW)
    assert res.finish_reasons == ["length"] * len(PROMPTS)
    assert res.stats["generated_tokens"] == NEW * len(PROMPTS)


def test_mixed_length_batch_equals_each_prompt_alone():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    batch = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None)
    for prompt, tokens in zip(PROMPTS, batch.tokens):
        alone = gen.generate(config, params, [prompt], max_new_tokens=NEW, eos_token_id=None)
        assert alone.tokens[0] == tokens


def test_eos_and_max_new_tokens_stop_each_sequence_on_its_own():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    free = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None).tokens
    eos = free[0][4]  # the 5th token of the first sequence becomes its EOS
    res = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=[eos, 9999])
    for full, got, reason in zip(free, res.tokens, res.finish_reasons):
        cut = full.index(eos) + 1 if eos in full else NEW
        assert got == full[:cut]
        assert reason == ("eos" if eos in full else "length")
    assert res.finish_reasons[0] == "eos" and len(res.tokens[0]) <= 5


class CharTokenizer:
    """A stand-in tokenizer: token i decodes to letter i mod 26."""

    def encode(self, text):
        return [ord(ch) - 97 for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_and_streamed_text():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    tok = CharTokenizer()
    free = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None, tokenizer=tok)
    stop = free.texts[1][5:7]
    events = []
    res = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None, tokenizer=tok,
                       stop_strings=[stop], on_token=events.append)
    for i, text in enumerate(free.texts):
        at = text.find(stop)
        if at >= 0:
            assert res.texts[i] == text[:at] and res.finish_reasons[i] == "stop"
            assert len(res.tokens[i]) == at + len(stop)  # one letter per token: stops on the completing one
        else:
            assert res.texts[i] == text and res.finish_reasons[i] == "length"
        mine = [e for e in events if e.index == i]
        assert [e.token for e in mine] == res.tokens[i]
        assert "".join(e.text or "" for e in mine) == res.texts[i]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    sp = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.3)
    a = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, sampling=sp, seed=1, eos_token_id=None)
    b = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, sampling=sp, seed=1, eos_token_id=None)
    c = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, sampling=sp, seed=2, eos_token_id=None)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_decode_compiles_once_per_shape():
    config, params, _, _ = tiny_checkpoint("tiny-v2")
    gen.generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=NEW, eos_token_id=None)
    before = gen._decode_sample_jit._cache_size(), gen._prefill_sample_jit._cache_size()
    # Other prompt lengths in the same bucket, other token counts in the same cache size: no new compile.
    gen.generate(config, params, [[9, 8, 7, 6, 5, 4, 3], [2]], max_new_tokens=NEW - 3, eos_token_id=None)
    assert (gen._decode_sample_jit._cache_size(), gen._prefill_sample_jit._cache_size()) == before


def test_greedy_with_repetition_penalty_matches_transformers():
    config, params, hf, _ = tiny_checkpoint("tiny-v2")
    prompt = PROMPTS[0]
    res = gen.generate(config, params, [prompt], max_new_tokens=NEW, eos_token_id=None,
                       sampling=SamplingParams(repetition_penalty=1.5))
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                      repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    assert res.tokens[0] == out[0, len(prompt):].tolist()
    st = res.stats
    # The rate is over the tokens after the first decode step, in the time they took (the first step, which
    # compiles on a first call, is timed apart): the three times add up and the rate is their quotient.
    assert st["decode_steady_tokens"] == st["generated_tokens"] - 2 * st["batch"]  # one at prefill, one at step 1
    np.testing.assert_allclose(st["decode_first_step_s"] + st["decode_steady_s"], st["decode_s"], rtol=1e-9)
    np.testing.assert_allclose(st["decode_tokens_per_s"], st["decode_steady_tokens"] / st["decode_steady_s"])


@pytest.mark.parametrize("speculative", [False, True])
def test_logprobs_are_the_sampled_tokens_log_probabilities(speculative):
    """``GenerationResult.logprobs`` (what GRPO keeps from sampling time) against a full forward of each prompt
    plus its completion: ``log_softmax(logits / T)`` at every generated token (fp32, 1e-4), plain and speculative
    (the bonus token's and the verified token's alike); greedy gives the model's own log-probability of its
    argmax."""
    import jax
    import jax.numpy as jnp

    import deepseek_jax as dsj

    config, params, _, _ = tiny_checkpoint("tiny-v3")
    forward = jax.jit(lambda p, toks: dsj.Transformer(config).apply({"params": p}, toks))
    for sp in (SamplingParams(temperature=0.8), SamplingParams()):
        res = gen.generate(config, params, PROMPTS, max_new_tokens=NEW, eos_token_id=None, sampling=sp, seed=3,
                           speculative=speculative)
        for prompt, tokens, logps in zip(PROMPTS, res.tokens, res.logprobs):
            assert len(logps) == len(tokens) == NEW
            logits = forward(params, jnp.asarray([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
            full = jax.nn.log_softmax(logits / (sp.temperature or 1.0), axis=-1)
            want = np.asarray(full)[np.arange(NEW), tokens]
            np.testing.assert_allclose(logps, want, atol=1e-4)
            assert (np.asarray(logps) < 0).all()
