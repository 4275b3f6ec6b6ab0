"""deepseek_jax.models.transformer / checkpoint: full-size parameter counts via jax.eval_shape, and the HF mapping's shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.checkpoint.hf_map import hf_tensor_map
from deepseek_jax.models.counts import param_counts


def _shapes(config):
    return jax.eval_shape(
        lambda: nn.meta.unbox(dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    )["params"]


def test_v2_lite_parameter_count():
    # Published: 15,706,484,224 parameters (the 4-shard bf16 release).
    assert param_counts(dsj.presets["deepseek-v2-lite"]) == {"main": 15_706_484_224}


def test_v3_parameter_counts():
    counts = param_counts(dsj.presets["deepseek-v3"])
    # Main model, the 58 MoE layers' correction biases included.
    assert counts["main"] == 671_026_419_200
    # The MTP module's own parameters (embedding and head are shared). transformers' MtpModel for the same
    # config holds exactly this many (parameters + the correction-bias buffer): 11,610,068,224.
    d = 7168
    moe_layer, rest = divmod(counts["main"] - 3 * _dense_layer(dsj.presets["deepseek-v3"]) - 2 * 129280 * d - d, 58)
    assert rest == 0
    # enorm, hnorm, shared_head.norm, eh_proj [D, 2D], then one MoE layer (its correction bias of E included).
    assert counts["mtp_0"] == 3 * d + 2 * d * d + moe_layer == 11_610_068_224


def _dense_layer(c):
    attn = (c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim
            + c.hidden_size * c.kv_cache_dim + c.kv_lora_rank
            + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
            + c.num_attention_heads * c.v_head_dim * c.hidden_size)
    return attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "deepseek-v2", "tiny-v3", "tiny-v2"])
def test_hf_mapping_covers_every_leaf_with_the_right_shape(name):
    config = dsj.presets[name]
    shapes = {tuple(k.key for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(_shapes(config))}
    maps = {tm.path: tm for tm in hf_tensor_map(config)}
    assert set(maps) == set(shapes)
    for path, tm in maps.items():
        assert tm.shape == shapes[path], path
        assert int(np.prod(tm.item_shape)) == int(np.prod(tm.hf_shape)), path
    keys = [k for tm in maps.values() for k, _ in tm.sources]
    assert len(keys) == len(set(keys)), "every HF tensor fills exactly one slot"
    if name == "deepseek-v2-lite":
        assert len(keys) == 5291  # the release's tensor count (docs/reference.md, section 4)
