"""deepseek_jax.models.transformer / checkpoint: logits, routing and MTP against transformers 5.x in float32."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_model, hf_mtp_model, save_with_mtp, torch_logits

import deepseek_jax as dsj
from deepseek_jax.moe.router import router_scores, select_experts

TOL = 1e-4
TINY_V3, TINY_V2 = dsj.presets["tiny-v3"], dsj.presets["tiny-v2"]

VARIANTS = {
    # q-LoRA, YaRN, 4 groups keep 2 (noaux_tc top-2-sum), renormalized weights, 1 dense layer, large bias.
    "v3-qlora-yarn-grouped": (TINY_V3, 0.3),
    # no q-LoRA, weights not renormalized, 2 dense layers, plain RoPE, groups of 2.
    "v3-noqlora-plainrope": (TINY_V3.replace(q_lora_rank=None, norm_topk_prob=False, first_k_dense_replace=2,
                                             num_hidden_layers=4, n_group=8, topk_group=3, rope_scaling=None,
                                             routed_scaling_factor=1.7), 0.3),
    # V2 group_limited_greedy (group score = max), no q-LoRA, YaRN with mscale 0.707.
    "v2-group-limited": (TINY_V2.replace(routed_scaling_factor=16.0), 0.0),
    # V2-Lite style greedy routing with q-LoRA.
    "v2-greedy-qlora": (TINY_V2.replace(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=24), 0.0),
    # YaRN without mscale / mscale_all_dim (plain softmax scale, cos/sin times mscale(factor)), rope on the two
    # halves (rope_interleave false), top-1 routing with norm_topk_prob (weight 1 * routed_scaling_factor).
    "v3-bare-yarn-halves-top1": (TINY_V3.replace(rope_scaling=dsj.RopeScaling(factor=4.0,
                                                                               original_max_position_embeddings=64),
                                                 rope_interleave=False, num_experts_per_tok=1), 0.3),
    # YaRN with an explicit attention_factor (overrides the mscale ratio for cos/sin) and mscale_all_dim 0.8.
    "v3-yarn-attention-factor": (TINY_V3.replace(rope_scaling=dsj.RopeScaling(
        factor=8.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8, attention_factor=1.3,
        beta_fast=16.0, beta_slow=2.0)), 0.3),
}


def _tokens(config, batch=3, length=11, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, length))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    config, bias_scale = VARIANTS[request.param]
    ref = hf_model(config, seed=len(request.param), bias_scale=bias_scale)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, max_shard_size="100KB")  # several shards + index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_config, params = dsj.load_pretrained(path)
    return request.param, config, ref, loaded_config, params


def test_logits_match_transformers(converted):
    name, config, ref, loaded_config, params = converted
    assert loaded_config == config.replace(num_nextn_predict_layers=0), "config.json round trip"
    tokens = _tokens(config)
    expected = torch_logits(ref, tokens)
    got = np.asarray(dsj.Transformer(loaded_config).apply({"params": params}, jnp.asarray(tokens)))
    assert got.shape == (3, 11, config.vocab_size)
    assert np.abs(got - expected).max() <= TOL, name
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero numbers


def test_router_matches_transformers(converted):
    """Same hidden states into our router and transformers' gate: same experts, same weights."""
    name, config, ref, _, params = converted
    layer = config.first_k_dense_replace
    gate = ref.model.layers[layer].mlp.gate
    x = np.random.RandomState(1).normal(size=(64, config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        _, ref_w, ref_idx = gate(torch.as_tensor(x))
    run = params["moe_layers"]["mlp"]["gate"]
    kernel = run["kernel"][0]
    bias = run["e_score_correction_bias"][0] if config.has_correction_bias else None
    scores = router_scores(jnp.asarray(x) @ kernel, config.scoring_func)
    w, idx = select_experts(scores, bias, config)
    ref_idx, ref_w = ref_idx.numpy(), ref_w.numpy()
    o_ref, o_got = np.argsort(ref_idx, axis=1), np.argsort(np.asarray(idx), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), o_got, 1), np.take_along_axis(ref_idx, o_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), o_got, 1), np.take_along_axis(ref_w, o_ref, 1),
                               rtol=1e-5, atol=1e-6)
    if bias is not None:
        _, idx_unbiased = select_experts(scores, None, config)
        changed = np.mean(np.sort(np.asarray(idx_unbiased), 1) != np.sort(np.asarray(idx), 1))
        assert changed > 0.1, "the correction bias must be large enough to change expert choices"


def test_softmax_scale_and_rope_factor_match_transformers():
    """The YaRN edge cases by their numbers: V3's scale 0.13523378; without mscale_all_dim, the plain
    qk_head_dim**-0.5 (0.0722 for V3's dims, where a default mscale_all_dim of 1 would give 0.1352); the cos/sin
    factor from attention_factor, the mscale ratio, or mscale(factor)."""
    from hf_reference import hf_config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from deepseek_jax.layers.rope import rope_attention_factor, rope_inv_freq

    v3 = dsj.presets["deepseek-v3"]
    assert v3.softmax_scale == pytest.approx(0.13523378, rel=1e-7)
    bare = v3.replace(rope_scaling=dsj.RopeScaling(factor=40.0, original_max_position_embeddings=4096))
    assert bare.softmax_scale == pytest.approx(192**-0.5) == pytest.approx(0.0722, abs=1e-4)
    cases = [v3, bare, *(c for c, _ in VARIANTS.values() if c.model_type == "deepseek_v3")]
    for config in cases:
        hf = hf_config(config.replace(num_hidden_layers=1, first_k_dense_replace=1))
        assert config.softmax_scale == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-7), config
        rotary = DeepseekV3RotaryEmbedding(hf)
        assert rope_attention_factor(config) == pytest.approx(rotary.attention_scaling, rel=1e-7), config
        np.testing.assert_allclose(rope_inv_freq(config), rotary.inv_freq.numpy(), rtol=1e-6)


def test_rope_interleave_false_is_refused_for_v2():
    with pytest.raises(dsj.ConfigError, match="rope_interleave"):
        TINY_V2.replace(rope_interleave=False)


def test_mtp_matches_transformers_mtp_model(tmp_path):
    config = TINY_V3.replace(num_hidden_layers=2)
    main = hf_model(config, seed=3, bias_scale=0.3)
    mtp = hf_mtp_model(main, seed=4)
    save_with_mtp(main, mtp, tmp_path)
    loaded_config, params = dsj.load_pretrained(tmp_path)
    assert loaded_config == config
    tokens = _tokens(config, batch=2, length=9, seed=5)
    logits, aux = dsj.Transformer(config).apply({"params": params}, jnp.asarray(tokens), return_mtp=True)
    (mtp_logits,) = aux["mtp_logits"]
    assert mtp_logits.shape == (2, 8, config.vocab_size)

    t = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = main(t, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1]  # main model's final (normed) hidden for positions 0..T-2
        positions = torch.arange(1, tokens.shape[1])[None].expand(2, -1)
        h = mtp.forward_layer(0, hidden, positions, None, input_ids=t[:, 1:])
        expected = mtp._project_to_logits(h).numpy()
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=TOL)
    assert np.abs(np.asarray(mtp_logits) - expected).max() <= TOL


def test_checkpoint_without_mtp_loads_main_model(tmp_path):
    config = TINY_V3.replace(num_hidden_layers=2)
    hf_model(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no 'model.layers.2.\\*' tensors"):
        loaded, params = dsj.load_pretrained(tmp_path)
    assert loaded.num_nextn_predict_layers == 0 and not any(k.startswith("mtp") for k in params)
