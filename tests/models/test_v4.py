"""DeepSeek-V4 (compressed and sparse attention, hyper-connections, hash-routed MoE) against transformers'
``DeepseekV4ForCausalLM`` in float32, and its attention core's gradients against a naive one."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_v4, load_hf, torch_logits

import deepseek_jax as dsj
from deepseek_jax.config.model import CSA, HCA, SWA, ModelConfig, RopeScaling
from deepseek_jax.layers.attention.compressed import naive_window_pool_attention, window_pool_attention

TOL = 1e-4
TINY = dsj.presets["tiny-v4"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    ref = hf_v4(TINY)
    config, params = load_hf(ref, tmp_path_factory.mktemp("v4"))
    return ref, config, params


@pytest.mark.parametrize("length", [3, 8, 29])
def test_logits_match_transformers(converted, length):
    """Every branch at once: an HCA layer (rate 8), two CSA layers (rate 2, overlapping windows, the indexer
    picking 3), a sliding-window-only layer (window 8), a hash-routed then learned MoE with the SwiGLU clamp active,
    2 residual streams. Lengths below and above the window and the rates, with partial windows at the end."""
    ref, config, params = converted
    assert config == TINY, "config.json round trip"
    tokens = np.random.RandomState(length).randint(0, TINY.vocab_size, (2, length))
    got = np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - torch_logits(ref, tokens)).max() <= TOL


def test_each_branch_matters(converted):
    """The indexer's choice, the hash table and the clamp each change the logits (so the parity above tests
    them): every pooled entry selected, another table, no clamp -> each moves the logits by more than 1e-3."""
    _, config, params = converted
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 29)))
    base = np.asarray(dsj.Transformer(config).apply({"params": params}, tokens))

    def moved(c, p=params):
        return np.abs(np.asarray(dsj.Transformer(c).apply({"params": p}, tokens)) - base).max()

    assert moved(config.replace(index_topk=64)) > 1e-3
    assert moved(config.replace(swiglu_limit=None)) > 1e-3
    table = params["hash_hca_0"]["mlp"]["gate"]["tid2eid"]
    other = jax.tree.map(lambda x: x, params)
    other["hash_hca_0"]["mlp"]["gate"]["tid2eid"] = (table + 1) % config.n_routed_experts
    assert moved(config, other) > 1e-3


def test_packed_documents_equal_each_document_alone(converted):
    """Two documents of 13 and 19 tokens packed in one row (the second starting at row 13, a multiple of neither
    rate), positions restarting at 0, then padding: each document's logits equal its forward alone (fp32, 1e-5).
    The compressors pool each document's own windows and rope its entries at document positions."""
    _, config, params = converted
    rng = np.random.RandomState(5)
    a, b = rng.randint(0, TINY.vocab_size, 13), rng.randint(0, TINY.vocab_size, 19)
    row = np.concatenate([a, b, np.zeros(3, int)])[None]
    positions = np.concatenate([np.arange(13), np.arange(19), np.zeros(3, int)])[None]
    segments = np.array([1] * 13 + [2] * 19 + [0] * 3)[None]
    model = dsj.Transformer(config)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments)))
    for doc, span in ((a, slice(0, 13)), (b, slice(13, 32))):
        alone = np.asarray(model.apply({"params": params}, jnp.asarray(doc[None])))
        assert np.abs(got[:, span] - alone).max() <= 1e-5


def test_yarn_compressed_rope_matches_transformers(tmp_path):
    """YaRN on the compressed branches' rope (as V4-Pro configures it), positions past the original length."""
    config = TINY.replace(rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=8,
                                                   beta_fast=32.0, beta_slow=1.0, attention_factor=1.0))
    ref = hf_v4(config, seed=1)
    loaded, params = load_hf(ref, tmp_path)
    assert loaded == config
    tokens = np.random.RandomState(1).randint(0, TINY.vocab_size, (1, 21))
    got = np.asarray(dsj.Transformer(loaded).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - torch_logits(ref, tokens)).max() <= TOL


def test_config_reads_transformers_names_and_legacy_keys():
    """transformers' config -> ours -> transformers keeps every field; the legacy keys (``compress_ratios``,
    ``num_hash_layers``, ``qk_rope_head_dim``) mean what transformers makes of them."""
    import transformers

    d = TINY.to_hf_dict()
    hf = transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert ModelConfig.from_hf_dict(hf.to_dict()) == TINY
    legacy = {k: v for k, v in d.items() if k not in ("layer_types", "mlp_layer_types", "partial_rotary_factor",
                                                      "rope_parameters", "compress_rates")}
    # Ratios name the layer kinds by the released rates (0, 4, 128); the rates themselves come separately.
    legacy.update(compress_ratios=[128, 4, 0, 4], compress_rate_csa=2, compress_rate_hca=8, num_hash_layers=1,
                  qk_rope_head_dim=8)
    assert ModelConfig.from_hf_dict(legacy) == TINY
    assert TINY.layer_types == (HCA, CSA, SWA, CSA)
    with pytest.raises(ValueError, match="compress_ratios.*expected 0, 4 or 128"):
        ModelConfig.from_hf_dict({**legacy, "compress_ratios": [8, 2, 0, 2]})
    with pytest.raises(ValueError, match="o_groups"):
        TINY.replace(o_groups=3)


def test_presets_count_what_transformers_counts():
    """``deepseek-v4-flash`` from shapes alone equals transformers' default ``DeepseekV4ForCausalLM`` on the meta
    device, 284,325,869,015 parameters, plus what transformers keeps as buffers and the checkpoint as tensors: the
    40 learned routers' correction biases (256 each) and the 3 hash layers' token -> expert tables (129,280 x 6).
    V4-Pro lands at about 1.6T."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from deepseek_jax.models.counts import param_counts

    with torch.device("meta"):
        hf = DeepseekV4ForCausalLM(DeepseekV4Config())
    params = sum(p.numel() for p in hf.parameters())
    buffers = sum(b.numel() for name, b in hf.named_buffers() if name.endswith(("e_score_correction_bias", "tid2eid")))
    assert (params, buffers) == (284_325_869_015, 40 * 256 + 3 * 129_280 * 6)
    assert param_counts(dsj.presets["deepseek-v4-flash"])["main"] == params + buffers
    assert dsj.presets["deepseek-v4-flash"] == ModelConfig.from_hf_dict(DeepseekV4Config().to_dict())
    assert 1.5e12 < param_counts(dsj.presets["deepseek-v4-pro"])["main"] < 1.7e12


@pytest.mark.parametrize("picked", [False, True])
def test_attention_core_gradients_equal_the_naive_core(picked):
    """The blockwise window + pool attention (blocks of 4 queries, window 5) against the whole-matrix reference,
    values and gradients (fp32, 1e-5), with two packed documents and padding; ``picked``: the pool read through
    the indexer's top-3 choice (some queries see fewer) instead of every visible entry."""
    rng = np.random.RandomState(2)
    b, t, h, d, c = 2, 13, 3, 8, 6
    q, kv = rng.normal(size=(b, t, h, d)), rng.normal(size=(b, t, d))
    pool, sinks = rng.normal(size=(b, c, d)), rng.normal(size=(h,))
    seg = np.array([[1] * 13, [1] * 7 + [2] * 4 + [0] * 2])
    index = np.broadcast_to(np.arange(t), (b, t))
    pool_index = np.broadcast_to(np.arange(c) * 2 + 1, (b, c))
    pool_seg = np.array([[1] * 6, [1, 1, 1, 0, 2, 0]])
    selected = None
    if picked:  # the indexer's way: the top 3 visible entries by a random score (fewer where fewer are visible)
        from deepseek_jax.layers.attention.layout import Layout
        from deepseek_jax.layers.attention.sparse import indexer_topk

        qi, ki, wi = rng.normal(size=(b, t, 2, 4)), rng.normal(size=(b, c, 4)), rng.normal(size=(b, t, 2))
        layout = Layout(*(jnp.asarray(x) for x in (index, seg, pool_index, pool_seg)))
        selected = indexer_topk(*(jnp.asarray(x, jnp.float32) for x in (qi, ki, wi)), layout, 3, 1.0)
        assert not bool(selected[1].all()) and bool(selected[1].any())
    args = [jnp.asarray(x, jnp.float32) for x in (q, kv, sinks)]
    fixed = dict(q_index=jnp.asarray(index), q_segment=jnp.asarray(seg), pool_index=jnp.asarray(pool_index),
                 pool_segment=jnp.asarray(pool_seg), selected=selected, window=5, scale=d ** -0.5)

    def loss(fn, q, kv, sinks, pool, **kw):
        out = fn(q, kv, sinks, pool=pool, **fixed, **kw)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    pool = jnp.asarray(pool, jnp.float32)
    want, want_g = jax.value_and_grad(lambda *a: loss(naive_window_pool_attention, *a), argnums=(0, 1, 2, 3))(
        *args, pool)
    got, got_g = jax.value_and_grad(lambda *a: loss(window_pool_attention, *a, q_block=4), argnums=(0, 1, 2, 3))(
        *args, pool)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_hyper_connection_mixing_is_doubly_stochastic(converted):
    """After Sinkhorn the mixing matrices' rows and columns sum to 1 (to 1e-3 after 20 rounds), and the pre / post
    weights lie in their ranges (``(eps, 1 + eps)``, ``(0, 2)``)."""
    from deepseek_jax.layers.hyper import HyperConnection

    _, config, params = converted
    p = jax.tree.map(lambda a: a[0], params["moe_csa_1"]["attn_hc"])
    h = jnp.asarray(np.random.RandomState(0).normal(size=(2, 5, config.hc_mult, config.hidden_size)), jnp.float32)
    post, comb, x = HyperConnection(config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps).apply(
        {"params": p}, h)
    np.testing.assert_allclose(comb.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(comb.sum(-2), 1.0, atol=1e-3)
    assert float(post.min()) > 0 and float(post.max()) < 2 and x.shape == (2, 5, config.hidden_size)


def test_hf_orbax_hf_round_trip_is_bit_exact_and_transformers_loads_it(converted, tmp_path):
    """transformers' save -> ``convert`` (Orbax, fp32) -> ``export``: every tensor bit for bit under DeepSeek's
    release names (transformers saves some with a ``model.`` prefix; both spellings are read), the hash table
    back as int64, and transformers loads the export with the same logits. ``export --fp8`` (128 x 128 e4m3
    blocks, the routed experts in FP4, the compressors' projections kept in full precision as the release keeps
    them) reads back within the rounding of e4m3 (e2m1 for the experts)."""
    from convert_fixtures import read_all
    from transformers import AutoModelForCausalLM

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import export
    from deepseek_jax.checkpoint.hf_map import canonical_v4_keys

    ref, config, params = converted
    src, orbax, out, fp8 = (str(tmp_path / n) for n in ("hf", "orbax", "out", "fp8"))
    ref.save_pretrained(src)
    convert(src, orbax, dtype="float32", progress=False)
    export(orbax, out, progress=False)
    a, b = read_all(src), read_all(out)
    a = {name: a[key] for name, key in canonical_v4_keys(list(a)).items()}
    assert set(a) == set(b) and "layers.0.ffn.gate.tid2eid" in b and "hc_head_fn" in b
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV4ForCausalLM"
    tokens = np.random.RandomState(3).randint(0, TINY.vocab_size, (2, 19))
    np.testing.assert_allclose(torch_logits(back, tokens), torch_logits(ref, tokens), atol=1e-6, rtol=0)

    with warnings.catch_warnings():  # a bf16 load keeps the hash table exact (fp32, as the correction biases)
        warnings.simplefilter("ignore")
        _, bf16 = dsj.load_pretrained(src, dtype=jnp.bfloat16)
    table = bf16["hash_hca_0"]["mlp"]["gate"]["tid2eid"]
    assert table.dtype == jnp.float32 and bf16["moe_csa_1"]["self_attn"]["q_b_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(table, params["hash_hca_0"]["mlp"]["gate"]["tid2eid"])
    export(orbax, fp8, fp8=True, progress=False)
    q = read_all(fp8)
    assert q["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert "layers.1.attn.wq_b.weight_scale_inv" in q
    assert q["layers.1.attn.compressor.wkv.weight"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg8, p8 = dsj.load_pretrained(fp8, dtype=jnp.float32)
    assert cfg8 == config
    exact = set()
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p8)):
        x, y, name = np.asarray(x, np.float32), np.asarray(y, np.float32), jax.tree_util.keystr(path)
        if np.array_equal(x, y):
            exact.add(name)
        elif "['experts']" in name:  # FP4 (e2m1, as V4's release): within a third of the largest value
            assert np.abs(x - y).max() <= np.abs(x).max() / 3, name
        else:  # e4m3 keeps 3 mantissa bits: within 1/16 of the block's largest value
            assert np.abs(x - y).max() <= np.abs(x).max() / 16, name
    assert "['moe_csa_1']['self_attn']['compressor']['kv_proj']['kernel']" in exact
    assert "['moe_csa_1']['attn_hc']['fn']" in exact and "['hash_hca_0']['mlp']['gate']['tid2eid']" in exact
    assert "['moe_csa_1']['self_attn']['q_b_proj']['kernel']" not in exact
    assert "['moe_csa_1']['mlp']['experts']['gate_proj']" not in exact


def test_cache_accounting_and_info():
    """V4-Flash's cache by hand, bf16: 43 layers keep a ring of 128 window entries of 512; the 20 CSA layers one
    entry of 512 and one indexer key of 128 per 4 tokens, the 23 HCA layers one entry of 512 per 128 tokens; the
    compressors' open windows are a fixed fp32 state (CSA: 8 tokens of both series, 2 x 512 wide, and the
    indexer's 2 x 128; HCA: 128 tokens of 512), values and gates. At 1M tokens that is 7.7% of V3.2's cache per
    token, as DeepSeek reports (about 7%); ``deepseek-jax info`` prints it."""
    from deepseek_jax.layers.kv_cache import v4_cache_bytes
    from deepseek_jax.tools.info import describe

    flash, n = dsj.presets["deepseek-v4-flash"], 1 << 20
    got = v4_cache_bytes(flash, n, "bfloat16")
    assert got["window"] == 43 * 128 * 512 * 2
    assert got["pool"] == (20 * (n // 4) + 23 * (n // 128)) * 512 * 2
    assert got["index"] == 20 * (n // 4) * 128 * 2
    assert got["state"] == (20 * 2 * 8 * (1024 + 256) + 23 * 2 * 128 * 512) * 4
    per_token = sum(got.values()) / n
    assert per_token / ((576 + 128) * 61 * 2) == pytest.approx(0.0768, abs=5e-4)
    assert "V3.2 85,888 bytes / token (7.7%)" in describe(flash)
