"""deepseek_jax.config: parsing the released config.json files, presets, validation."""

from __future__ import annotations

import json
import os

import pytest

import deepseek_jax as dsj
from deepseek_jax.config import ConfigError, ModelConfig

# The released config.json files, copied from shared/fixtures (the weights are not available offline).
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def _fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("fixture,preset", [
    ("deepseek-v3.config.json", "deepseek-v3"),
    ("deepseek-v2-lite.config.json", "deepseek-v2-lite"),
])
def test_released_config_equals_preset(tmp_path, fixture, preset):
    (tmp_path / "config.json").write_text(json.dumps(_fixture(fixture)))
    assert ModelConfig.from_pretrained(tmp_path) == dsj.presets[preset]


def test_release_values():
    v3, lite = dsj.presets["deepseek-v3"], dsj.presets["deepseek-v2-lite"]
    assert dsj.presets["deepseek-r1"] == v3 and dsj.presets["deepseek-v3.1"] == v3
    # docs/reference.md, section 1: softmax scales with the YaRN mscale.
    assert v3.softmax_scale == pytest.approx(0.13523378, abs=1e-8)
    assert lite.softmax_scale == pytest.approx(0.11472139, abs=1e-8)
    assert v3.kv_cache_dim == 576 and v3.qk_head_dim == 192
    assert [r for r in v3.layer_runs] == [("dense_layers", 0, 3), ("moe_layers", 3, 58)]
    assert lite.layer_runs == (("dense_layers", 0, 1), ("moe_layers", 1, 26))


def test_rope_parameters_form_equals_rope_scaling_form():
    d = _fixture("deepseek-v3.config.json")
    new = dict(d)
    rs = new.pop("rope_scaling")
    new.pop("rope_theta")
    new["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn",
                              "rope_theta": 10000.0}
    assert ModelConfig.from_hf_dict(new) == ModelConfig.from_hf_dict(d)


def test_hf_dict_round_trip():
    for name in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny-v2", "tiny-v3"):
        c = dsj.presets[name]
        assert ModelConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c


def test_moe_layer_freq_runs():
    c = dsj.presets["tiny-v3"].replace(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    # MoE iff idx >= 1 and idx % 2 == 0: layers 2 and 4.
    assert c.layer_runs == (("dense_layers_0", 0, 2), ("moe_layers_0", 2, 1), ("dense_layers_1", 3, 1),
                            ("moe_layers_1", 4, 1), ("dense_layers_2", 5, 1))


@pytest.mark.parametrize("changes,field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 20}, "num_experts_per_tok"),
    ({"q_lora_rank": -1}, "q_lora_rank"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"topk_method": "random"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        dsj.presets["tiny-v3"].replace(**changes)


def test_bad_config_json(tmp_path):
    d = _fixture("deepseek-v3.config.json")
    d["n_group"] = 7
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json: field 'n_group' = 7"):
        ModelConfig.from_pretrained(tmp_path)
    d["model_type"] = "mistral"
    with pytest.raises(ConfigError, match="unsupported architecture model_type='mistral'"):
        ModelConfig.from_hf_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="deepseek-v2-lite"):
        dsj.presets["deepseek-v9"]


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2"])
def test_deepseek_config_json_leaves_the_students_fields_to_transformers(preset):
    """The dense students' fields (head_dim, mlp_bias, use_sliding_window) stay out of a DeepSeek config.json:
    transformers' DeepSeek configs set head_dim to the rope part themselves, and a written null would win."""
    from transformers import AutoConfig

    d = dsj.presets[preset].to_hf_dict()
    assert not set(d) & {"head_dim", "mlp_bias", "use_sliding_window"}
    hf = AutoConfig.for_model(**{k: v for k, v in d.items() if k != "model_type"}, model_type=d["model_type"])
    assert hf.head_dim == dsj.presets[preset].qk_rope_head_dim
