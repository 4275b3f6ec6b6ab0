"""deepseek_jax.inference.steps and deepseek_jax.layers.kv_cache: cached prefill/decode against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_inference import tiny_checkpoint

import deepseek_jax as dsj
from deepseek_jax.inference import steps as decode
from deepseek_jax.layers import kv_cache as kvcache


@pytest.fixture(scope="module", params=["tiny-v3", "tiny-v2"])
def model(request):
    config, params, _, _ = tiny_checkpoint(request.param)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, config.vocab_size)
    return config, params, tokens


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_cached_decode_matches_full_forward_at_every_position(model, absorb):
    config, params, tokens = model
    if not absorb and config.model_type == "deepseek_v2":
        pytest.skip("the naive path is checked on V3 only (compile time)")
    full = jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens)
    cached = decode.decode_all_positions(params, tokens, config=config, absorb=absorb, prefill_len=3)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_fp8_cache_is_close_to_full_forward():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, config.vocab_size)
    full = np.asarray(jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens))
    cached = np.asarray(decode.decode_all_positions(params, tokens, config=config, cache_dtype="fp8",
                                                    prefill_len=3))
    # e4m3 keeps 3 mantissa bits per cached value (~3% relative error each): far above fp32's error, and
    # still well below the spread of the logits.
    err = (cached - full)[:, 3:]
    relative_rms = np.sqrt((err**2).mean() / (full[:, 3:] ** 2).mean())
    assert 1e-4 < relative_rms < 0.12, relative_rms
    assert (cached.argmax(-1) == full.argmax(-1)).mean() >= 0.75


def test_mtp_cached_decode_matches_transformer_mtp_logits():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    assert config.num_nextn_predict_layers == 1
    b, t, p = 2, 9, 4
    tokens = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, config.vocab_size)
    forward = jax.jit(lambda p, x: dsj.Transformer(config).apply({"params": p}, x, return_mtp=True,
                                                                  return_hidden=True))
    _, aux = forward(params, tokens)
    want = np.asarray(aux["mtp_logits"][0])  # [B, T-1, V]: entry i pairs h_i with token i+1

    cache = kvcache.init_cache(config, b, 128, mtp=True)
    lengths = jnp.full((b,), p, jnp.int32)
    cache, _, _ = decode.prefill(params, cache, tokens[:, :p], lengths, config=config,
                                 options=dsj.ModelOptions(), mtp=True)
    hidden = aux["hidden"]
    for pos in range(p, t):  # MTP row at position pos pairs h_{pos-1} with token pos
        cache, logits, _ = decode.mtp_step(params, cache, hidden[:, pos - 1:pos], tokens[:, pos:pos + 1],
                                           jnp.full((b, 1), pos, jnp.int32), config=config,
                                           options=dsj.ModelOptions())
        np.testing.assert_allclose(np.asarray(logits[:, 0]), want[:, pos - 1], atol=1e-4, rtol=1e-4)


def test_cache_size_equals_formula():
    v3 = dsj.presets["deepseek-v3"]
    assert v3.kv_cache_dim == 576
    assert kvcache.cache_bytes_per_token(v3, "bfloat16") == 576 * 61 * 2 == 70_272
    assert kvcache.cache_bytes_per_token(v3, "fp8") == (576 + 8) * 61
    shapes = jax.eval_shape(lambda: kvcache.init_cache(v3, 8, 4096, "bfloat16"))
    assert kvcache.cache_nbytes(shapes) == 70_272 * 8 * 4096
    tiny = dsj.presets["tiny-v3"]
    for dtype in kvcache.CACHE_DTYPES:
        cache = kvcache.init_cache(tiny, 3, 64, dtype, mtp=True)
        per_token = kvcache.cache_bytes_per_token(tiny, dtype, mtp=True)
        assert per_token == (tiny.kv_lora_rank + tiny.qk_rope_head_dim) * 4 * {
            "float32": 4, "bfloat16": 2, "fp8": 1}[dtype] + (4 * 8 if dtype == "fp8" else 0)
        assert kvcache.cache_nbytes(cache) == per_token * 3 * 64


def test_cache_write_puts_each_sequence_at_its_positions():
    config = dsj.presets["tiny-v3"]
    cache = kvcache.init_cache(config, 2, 8)
    name = config.layer_runs[-1][0]
    entry = cache["main"][name]
    n_layers = entry["c_kv"].shape[0]
    c = jnp.arange(n_layers * 2 * 2 * config.kv_lora_rank, dtype=jnp.float32).reshape(n_layers, 2, 2, -1)
    pe = jnp.ones((n_layers, 2, 2, config.qk_rope_head_dim))
    positions = jnp.array([[3, 4], [6, 7]])
    new = kvcache.write(entry, (c, pe), positions)
    np.testing.assert_array_equal(new["c_kv"][:, 0, 3:5], c[:, 0])
    np.testing.assert_array_equal(new["c_kv"][:, 1, 6:8], c[:, 1])
    assert float(jnp.abs(new["c_kv"][:, 0, :3]).sum()) == 0 and float(jnp.abs(new["c_kv"][:, 1, :6]).sum()) == 0
    dropped = kvcache.write(entry, (c, pe), jnp.array([[7, 8], [8, 9]]))  # past the end: dropped, not clipped
    np.testing.assert_array_equal(dropped["c_kv"][:, 0, 7], c[:, 0, 0])
    assert float(jnp.abs(dropped["c_kv"][:, 1]).sum()) == 0


def test_bf16_decode_is_close_to_bf16_full_forward():
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, config.vocab_size)
    options = dsj.ModelOptions(dtype="bfloat16")
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim > 1 else x, params)
    full = np.asarray(jax.jit(dsj.Transformer(config, options).apply)({"params": bf16}, tokens))
    exact = np.asarray(jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens))
    cached = np.asarray(decode.decode_all_positions(bf16, tokens, config=config, options=options,
                                                    cache_dtype="bfloat16", prefill_len=3))
    # The cached path (absorbed MLA, one token a step) is as close to fp32 as the bf16 full forward is (measured
    # 0.0553 against 0.0500), and at a typical position close to the bf16 full forward (0.006-0.016 against a
    # logit rms of 0.80). A position where the two bf16 paths route a near-tie to different experts differs more
    # (2 of 14 here, 0.18-0.20), so the second bound takes the median over positions.
    rms = lambda x: np.sqrt((x[:, 3:] ** 2).mean())  # noqa: E731
    assert rms(cached - exact) < 1.25 * rms(full - exact) + 1e-6
    per_position = np.sqrt(((cached - full)[:, 3:] ** 2).mean(-1))
    assert np.median(per_position) < 0.05 * rms(full)


def test_chunked_prefill_equals_full_prefill_and_generation_is_identical():
    """A long prompt prefilled 16 tokens at a time (a scan of absorbed-path chunks over the cache written so
    far) gives the full prefill's cache, last-token logits and last hidden states; greedy and speculative
    generation after it are token for token the same."""
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    rng = np.random.RandomState(4)
    lengths = np.array([50, 33, 61])  # bucket 64: 4 chunks; each prompt ends in another chunk
    tokens = np.zeros((3, 64), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.randint(3, config.vocab_size, n)
    out = {}
    for chunk in (None, 16):
        cache = kvcache.init_cache(config, 3, 128, mtp=True)
        out[chunk] = decode.prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), config=config,
                                    options=dsj.ModelOptions(), mtp=True, chunk=chunk)
    (c_full, l_full, h_full), (c_chunk, l_chunk, h_chunk) = out[None], out[16]
    np.testing.assert_allclose(np.asarray(l_chunk), np.asarray(l_full), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(h_chunk), np.asarray(h_full), atol=1e-4, rtol=1e-4)
    valid = np.arange(128)[None, :] < lengths[:, None]  # slots past a prompt hold padding, never read
    for a, b in zip(jax.tree.leaves(c_chunk), jax.tree.leaves(c_full)):
        a, b = np.asarray(a), np.asarray(b)
        batch_axis = a.ndim - 3
        mask = np.expand_dims(valid, tuple(range(batch_axis))) if batch_axis else valid
        mask = np.broadcast_to(mask[..., None], a.shape)
        np.testing.assert_allclose(a[mask], b[mask], atol=1e-4, rtol=1e-4)
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    for speculative in (False, True):
        runs = [dsj.generate(config, params, prompts, max_new_tokens=8, eos_token_id=None, speculative=speculative,
                             prefill_chunk=chunk).tokens for chunk in (None, 16)]
        assert runs[0] == runs[1], speculative
