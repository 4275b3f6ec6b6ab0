"""DeepSeek-V3.2 (DSA) against transformers' ``DeepseekV32ForCausalLM`` in float32: a tiny config whose
``index_topk`` is smaller than the context, so the indexer's choice decides the logits."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_model, torch_logits

import deepseek_jax as dsj

TOL = 1e-4
V32 = dsj.presets["tiny-v3"].replace(model_type="deepseek_v32", index_topk=4, index_head_dim=16, index_n_heads=8,
                                     num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    ref = hf_model(V32, seed=3, bias_scale=0.3)
    path = tmp_path_factory.mktemp("v32")
    ref.save_pretrained(path, max_shard_size="100KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, params = dsj.load_pretrained(path)
    return ref, config, params


def test_logits_match_transformers_where_sparsity_bites(converted):
    ref, config, params = converted
    assert config == V32, "config.json round trip"
    tokens = np.random.RandomState(0).randint(0, V32.vocab_size, (3, 11))
    expected = torch_logits(ref, tokens)
    got = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= TOL
    # The indexer matters: with every key selected (V3's dense attention on the same weights) the logits move.
    dense = np.asarray(dsj.Transformer(config.replace(index_topk=11)).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(dense - expected).max() > 100 * TOL


def test_packed_documents_equal_each_document_alone(converted):
    """Two documents packed in one row (segment ids, per-document positions) and padding: each document's logits
    equal transformers' on that document alone; the indexer never picks a key of the other document."""
    ref, config, params = converted
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, V32.vocab_size, 7), rng.randint(0, V32.vocab_size, 6)
    tokens = np.concatenate([a, b, [0, 0]])[None]
    segments = np.asarray([[1] * 7 + [2] * 6 + [0, 0]])
    positions = np.asarray([list(range(7)) + list(range(6)) + [0, 0]])
    got = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                                   jnp.asarray(segments)))
    np.testing.assert_allclose(got[0, :7], torch_logits(ref, a[None])[0], atol=TOL)
    np.testing.assert_allclose(got[0, 7:13], torch_logits(ref, b[None])[0], atol=TOL)


def test_gradients_flow_into_the_indexer_only_through_its_loss_and_the_model_trains(converted):
    """The main loss has no gradient into the indexer (top-k is not differentiable: the reference detaches it);
    every other weight gets one."""
    _, config, params = converted
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, V32.vocab_size, (2, 11)))

    def loss(p):
        logits = dsj.Transformer(config).apply({"params": p}, tokens)
        return jax.nn.log_softmax(logits).mean()

    grads = jax.grad(loss)(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
            jax.tree_util.tree_leaves_with_path(grads)}
    indexer = {k: float(jnp.abs(v).max()) for k, v in flat.items() if "/indexer/" in k}
    assert indexer and all(v == 0 for v in indexer.values()), indexer
    assert float(jnp.abs(flat["dense_layers/self_attn/kv_b_proj/kernel"]).max()) > 0


def test_the_preset_counts_what_transformers_counts():
    """``deepseek-v3.2``'s main model from shapes alone equals transformers' ``DeepseekV32ForCausalLM`` with its
    default config on the meta device: 671,877,929,216 parameters plus the 58 MoE layers' correction biases (256
    each), which transformers keeps as buffers and the checkpoint as tensors."""
    import torch
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from deepseek_jax.models.counts import param_counts

    with torch.device("meta"):
        hf = DeepseekV32ForCausalLM(DeepseekV32Config())
    params = sum(p.numel() for p in hf.parameters())
    biases = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert (params, biases) == (671_877_929_216, 58 * 256)
    counts = param_counts(dsj.presets["deepseek-v3.2"])
    assert counts["main"] == params + biases
    assert counts["mtp_0"] > 0  # the MTP module, with its own indexer


def test_hf_orbax_hf_round_trip_is_bit_exact_and_transformers_loads_it(converted, tmp_path):
    """HF -> ``convert`` (Orbax, fp32) -> ``export``: every tensor, the indexer's included, bit for bit; the
    export's config.json names ``DeepseekV32ForCausalLM`` and transformers loads it with the same logits."""
    import torch
    from convert_fixtures import read_all
    from transformers import AutoModelForCausalLM

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import export

    ref, _, _ = converted
    src, orbax, out = str(tmp_path / "hf"), str(tmp_path / "orbax"), str(tmp_path / "out")
    ref.save_pretrained(src)
    convert(src, orbax, dtype="float32", progress=False)
    export(orbax, out, progress=False)
    a, b = read_all(src), read_all(out)
    assert set(a) == set(b) and any(".indexer.wq_b." in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV32ForCausalLM"
    tokens = np.random.RandomState(3).randint(0, V32.vocab_size, (2, 9))
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(ref, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_decode_equals_the_full_forward(converted, prefill_chunk):
    """Greedy generation over the latent cache plus the indexer's key cache, prompts longer than ``index_topk``
    (so the cached steps select too), whole or in chunks of 4 (each chunk attends to the cache so far): every
    generated token is the full forward's argmax, and its log-probability equals the full forward's (1e-4)."""
    from deepseek_jax.inference.generation import generate
    from deepseek_jax.layers import kv_cache

    _, config, params = converted
    rng = np.random.RandomState(4)
    prompts = [rng.randint(0, V32.vocab_size, n).tolist() for n in (9, 6, 12)]
    res = generate(config, params, prompts, max_new_tokens=8, eos_token_id=None, prefill_chunk=prefill_chunk)
    forward = jax.jit(lambda p, t: dsj.Transformer(config).apply({"params": p}, t))
    for prompt, tokens, logps in zip(prompts, res.tokens, res.logprobs):
        logits = np.asarray(forward(params, jnp.asarray([prompt + tokens[:-1]])))[0, len(prompt) - 1:]
        assert tokens == logits.argmax(-1).tolist()
        full = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))[np.arange(len(tokens)), tokens]
        np.testing.assert_allclose(logps, full, atol=1e-4)
    # The cache holds the indexer's keys beside the latent: 576 + 128 values per token and layer in the preset,
    # and `deepseek-jax info` says so.
    from deepseek_jax.tools.info import describe

    assert kv_cache.cache_bytes_per_token(dsj.presets["deepseek-v3.2"], "bfloat16") == (576 + 128) * 61 * 2
    assert "576 + 128 (indexer key) values x 61 layers = 42,944 values (85,888 bytes in bf16)" in describe(
        dsj.presets["deepseek-v3.2"])
