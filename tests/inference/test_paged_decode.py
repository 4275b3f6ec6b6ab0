"""Ragged (paged) decode (``layers/attention/paged.py``, ``steps.decode_core(paged=...)``) against the padded decode
over the whole cache, in fp32: rows of very different lengths, one and two new tokens, an fp8 cache, a page size
that does not divide the cache, and a dense student (GQA)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_inference import engine_tokens, tiny_checkpoint

import deepseek_jax as dsj
from deepseek_jax.inference import steps
from deepseek_jax.layers import kv_cache
from deepseek_jax.layers.attention.layout import paged_layout, pages_needed

LENGTHS = [37, 3, 1, 70]  # the cached tokens of each row before the step
SLOTS = 128


def _filled(config, params, dtype):
    """A cache of 4 rows prefilled with random prompts of LENGTHS, and each row's next two tokens."""
    tokens = jax.random.randint(jax.random.PRNGKey(3), (len(LENGTHS), 80), 0, config.vocab_size)
    cache = kv_cache.init_cache(config, len(LENGTHS), SLOTS, dtype)
    cache, _, _ = steps.prefill(params, cache, tokens, jnp.asarray(LENGTHS), config=config,
                                options=dsj.ModelOptions(), chunk=None)
    nxt = jax.random.randint(jax.random.PRNGKey(4), (len(LENGTHS), 2), 0, config.vocab_size)
    return cache, nxt


def _both(config, params, cache, tokens, page):
    """The step's logits and written cache, padded (every row over all SLOTS slots) and paged."""
    positions = jnp.asarray(LENGTHS)[:, None] + jnp.arange(tokens.shape[1])
    paged = steps.decode_pages(LENGTHS, page, ahead=tokens.shape[1])
    out = []
    for kw in ({}, {"paged": paged}):
        c, logits, _ = steps.decode_core(params, jax.tree.map(jnp.copy, cache), tokens, positions, config=config,
                                         options=dsj.ModelOptions(), **kw)
        out.append((np.asarray(logits), c))
    return out


@pytest.mark.parametrize("dtype,new,page", [("float32", 1, 16), ("float32", 2, 48), ("fp8", 1, 32)],
                         ids=["one-token", "two-tokens-page48", "fp8"])
def test_paged_decode_equals_padded_decode_on_v3(dtype, new, page):
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    cache, nxt = _filled(config, params, dtype)
    (padded, c_padded), (paged, c_paged) = _both(config, params, cache, nxt[:, :new], page)
    assert np.abs(padded).max() > 1.0  # logits of real spread
    np.testing.assert_allclose(paged, padded, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(c_paged), jax.tree.leaves(c_padded)):  # the same entries written
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=1e-5)


def test_paged_decode_equals_padded_decode_on_a_gqa_student():
    config = dataclasses.replace(dsj.presets["tiny-qwen2"], initializer_range=0.2)
    params = dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    cache, nxt = _filled(config, params, "float32")
    (padded, _), (paged, _) = _both(config, params, cache, nxt, 16)
    assert np.abs(padded).max() > 0.1
    np.testing.assert_allclose(paged, padded, atol=1e-5, rtol=1e-5)


def test_the_work_list_follows_each_rows_own_length():
    page = 16
    assert pages_needed(LENGTHS, page) == 3 + 1 + 1 + 5
    positions = jnp.asarray(LENGTHS)[:, None]
    layout = paged_layout(positions, 12, page)  # 10 pages needed, 2 items spare
    np.testing.assert_array_equal(np.asarray(layout.item_row), [0, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(np.asarray(layout.item_slots[:, 0]), [0, 16, 32, 0, 0, 0, 16, 32, 48, 64, 0, 0])
    np.testing.assert_array_equal(np.asarray(layout.item_len), [37] * 3 + [3, 1] + [70] * 5 + [0, 0])
    # rounded up to 4..7 times a power of two, past the pages the rows reach over the call
    assert steps.decode_pages(LENGTHS, page, ahead=4) == (page, 10)
    assert steps.decode_pages([100] * 8, page, ahead=1) == (page, 56)


def test_paged_decode_is_refused_where_it_does_not_apply():
    config = dsj.presets["tiny-v4"]
    with pytest.raises(ValueError, match="paged decode"):
        steps.decode_core({}, {"main": {}}, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                          config=dataclasses.replace(dsj.presets["deepseek-v3.2"]), options=dsj.ModelOptions(),
                          paged=(16, 1))
    assert not steps.pages_supported(config) and steps.pages_supported(dsj.presets["tiny-v3"])


def test_decode_reads_pages_only_where_they_pay():
    # short rows: the window (one compile per power of two)
    assert steps.decode_reads([100, 3], 1, 4096) == {"window": 128, "paged": None}
    # long rows of about one length: the window reads as much
    assert steps.decode_reads([2000] * 8, 4, 4096) == {"window": 2048, "paged": None}
    # a short row beside a long one: pages, and a free slot (length 0) reads none
    # 32 + 2 pages, rounded up to 5 x 8
    assert steps.decode_reads([2000, 100, 0, 0], 4, 4096) == {"window": None, "paged": (64, 40)}
    assert steps.decode_reads([2000, 100], 4, 4096, page=None) == {"window": 2048, "paged": None}


@pytest.mark.slow  # the engine compiles its steps for a 520-token row
def test_engine_and_generate_on_pages_give_the_windowed_engines_tokens():
    """A 520-token prompt beside short ones: the engine reads pages (``stats["paged_calls"]``), and its greedy
    tokens equal those of the engine that reads the window (``page=None``) and of ``generate``."""
    import flax.linen as nn

    from deepseek_jax.inference.engine import Engine

    config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)
    params = nn.meta.unbox(dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
                           ["params"])
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, config.vocab_size, n)) for n in (520, 4, 9)]
    ref = dsj.generate(config, params, prompts, max_new_tokens=12, eos_token_id=None)
    outs = {}
    for page in (64, None):
        engine = Engine(config, params, slots=2, max_len=640, page=page).start()
        outs[page] = engine_tokens(engine, prompts, 12)
        assert (engine.stats["paged_calls"] > 0) == (page is not None), engine.stats
    assert outs[64] == outs[None] == ref.tokens
