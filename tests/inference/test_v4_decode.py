"""DeepSeek-V4 decoding over its compressed cache (``layers/kv_cache.py``'s V4 entries: a window ring, the pooled
entries, CSA's indexer keys, the compressors' open windows) against the full forward pass, which
``tests/models/test_v4.py`` holds to transformers' logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_v4, load_hf

import deepseek_jax as dsj
from deepseek_jax.config.model import CSA, HCA, SWA
from deepseek_jax.inference.generation import generate
from deepseek_jax.inference.steps import decode_all_positions
from deepseek_jax.layers import kv_cache

TINY = dsj.presets["tiny-v4"]  # window 8; CSA rate 2 (indexer top-3), HCA rate 8; 2 streams


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return load_hf(hf_v4(TINY, seed=3), tmp_path_factory.mktemp("v4"))


@pytest.mark.parametrize("prefill_len", [1, 6, 17])
def test_decode_equals_the_full_forward(converted, prefill_len):
    """Prefill ``prefill_len`` tokens, then decode one at a time up to 40: every position's logits equal the full
    forward's (fp32, 1e-4; measured 4e-6). The decode crosses the window (8), CSA's (2) and HCA's (8) window ends
    many times, and the prefill leaves a partial window of each kind open in the compressors' state."""
    config, params = converted
    tokens = jnp.asarray(np.random.RandomState(prefill_len).randint(0, TINY.vocab_size, (2, 40)))
    full = np.asarray(dsj.Transformer(config).apply({"params": params}, tokens))
    got = np.asarray(decode_all_positions(params, tokens, config=config, prefill_len=prefill_len))
    assert np.abs(got - full).max() <= 1e-4


def test_generate_greedy_equals_full_forward_greedy(converted):
    """Three prompts of 3, 11 and 20 tokens prefilled together (right-padded to 32: the padding must not reach the
    rings or the pools), 25 greedy tokens each: every generated token is the full forward's argmax after the
    prompt and the tokens before it, so the sequences are the full forward's greedy ones."""
    config, params = converted
    prompts = [list(np.random.RandomState(i).randint(0, TINY.vocab_size, n)) for i, n in enumerate((3, 11, 20))]
    result = generate(config, params, prompts, max_new_tokens=25, eos_token_id=None, min_bucket=32)
    for prompt, out in zip(prompts, result.tokens):
        logits = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray([prompt + out])))[0]
        assert len(out) == 25
        assert logits[len(prompt) - 1: -1].argmax(-1).tolist() == out
    assert result.stats["cache_bytes"] == 3 * sum(kv_cache.v4_cache_bytes(TINY, result.stats["cache_slots"],
                                                                          "float32").values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_cache_holds_what_the_accounting_says(dtype):
    """``init_cache`` allocates exactly ``v4_cache_bytes`` (which ``deepseek-jax info`` prints): per layer a ring of
    ``sliding_window`` entries, ``length // rate`` pooled entries (and indexer keys for CSA), fp32 compressor
    state of ``rate`` tokens (HCA) or ``2 * rate`` at twice the width (CSA's overlapping windows)."""
    cache = kv_cache.init_cache(TINY, 3, 64, dtype)
    assert kv_cache.cache_nbytes(cache) == 3 * sum(kv_cache.v4_cache_bytes(TINY, 64, dtype).values())
    hca, csa, swa = cache["main"]["hash_hca_0"], cache["main"]["moe_csa_1"], cache["main"]["moe_swa_2"]
    d, di = TINY.head_dim, TINY.index_head_dim
    assert hca["pool"].shape == (1, 3, 64 // 8, d) and hca["kv_state"].shape == (1, 3, 8, d)
    assert csa["index_k"].shape == (1, 3, 32, di) and csa["gate_state"].shape == (1, 3, 4, 2 * d)
    assert csa["index_kv_state"].dtype == jnp.float32 and set(swa) == {"window"} | ({"window_scale"} if dtype ==
                                                                                       "fp8" else set())
    assert [TINY.layer_types[i] for i in (0, 1, 2)] == [HCA, CSA, SWA]


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_write_keeps_the_last_ring_tokens_and_finished_entries(dtype):
    """``write_v4`` by hand, one row of 11 tokens of which 9 are valid (a padded prompt): the ring of 4 takes
    positions 5..8 at slots 1, 2, 3, 0 (padding writes nothing, nor do tokens the ring has moved past); the pool
    (rate 3) takes the tokens ending a window, 2, 5, 8, at slots 0, 1, 2. Read back within the format's rounding
    (bf16 2^-8, e4m3 with one scale per vector 2^-3 of the vector's largest value)."""
    rng = np.random.RandomState(0)
    entry = {"window": jnp.zeros((1, 1, 4, 6)), "pool": jnp.zeros((1, 1, 5, 6))}
    if dtype == "fp8":
        entry = {k: v.astype(jnp.float8_e4m3fn) for k, v in entry.items()}
        entry.update(window_scale=jnp.ones((1, 1, 4)), pool_scale=jnp.ones((1, 1, 5)))
    else:
        entry = {k: v.astype(jnp.bfloat16) for k, v in entry.items()}
    values = rng.normal(size=(1, 1, 11, 6)).astype(np.float32)
    positions = jnp.arange(11, dtype=jnp.int32)[None]
    valid = positions < 9
    got = kv_cache.read_v4(kv_cache.write_v4(entry, {"window": values, "pool": values}, positions, valid, 3),
                           jnp.float32)
    window, pool = np.asarray(got["window"])[0, 0], np.asarray(got["pool"])[0, 0]
    want_window, want_pool = values[0, 0, [8, 5, 6, 7]], values[0, 0, [2, 5, 8]]
    rel = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -3
    for g, w in ((window, want_window), (pool[:3], want_pool)):
        assert np.all(np.abs(g - w) <= rel * np.abs(w).max(-1, keepdims=True))
    assert not pool[3:].any()


def test_ring_positions():
    """Slot s of a ring of 4 after positions 0..5 (first new token 6) holds the latest position = s mod 4:
    4, 5, 2, 3; before anything is written every slot is empty (negative)."""
    got = kv_cache.ring_positions(jnp.asarray([6, 0, 2]), 4)
    assert got[0].tolist() == [4, 5, 2, 3]
    assert (got[1] < 0).all() and got[2].tolist()[:2] == [0, 1] and (got[2, 2:] < 0).all()


def test_speculative_decoding_says_v4_has_no_mtp_module(converted):
    config, params = converted
    with pytest.raises(ValueError, match="V4's is not built"):
        generate(config, params, [[1, 2, 3]], max_new_tokens=2, speculative=True)
