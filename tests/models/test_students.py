"""deepseek_jax.layers.gqa / config / rope / checkpoint for the dense R1-Distill students (Qwen2, Llama 3): logits against
transformers' Qwen2ForCausalLM / LlamaForCausalLM in float32, the presets' parameter counts against the releases,
decode against the full forward, and the HF -> Orbax -> HF round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import deepseek_jax as dsj
from deepseek_jax.layers.rope import rope_inv_freq
from deepseek_jax.models.counts import param_counts

TOL = 1e-4
TINY_QWEN2, TINY_LLAMA = dsj.presets["tiny-qwen2"], dsj.presets["tiny-llama"]


def hf_student(config: dsj.ModelConfig, seed: int = 0, init_std: float | None = None):
    """A random transformers Qwen2ForCausalLM / LlamaForCausalLM for one of our dense configs (fp32, eval), with
    non-zero biases and non-trivial norm scales (``init_std``: re-draw the other weights with this std)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    d = config.to_hf_dict()
    d.pop("rope_scaling")
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if config.model_type == "qwen2" else (LlamaConfig,
                                                                                               LlamaForCausalLM)
    hf_cfg = cfg_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)  # large enough that a dropped or misplaced bias shows
            elif init_std is not None:
                p.normal_(0.0, init_std)
    return model


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


STUDENTS = {
    # q/k/v biases, GQA 4 heads on 2, untied head.
    "qwen2": TINY_QWEN2,
    # Qwen2.5-1.5B-style tied embeddings, 3 layers, 6 heads on 2 groups of 3, explicit head_dim != D / H.
    "qwen2-tied-headdim": TINY_QWEN2.replace(tie_word_embeddings=True, num_hidden_layers=3, num_attention_heads=6,
                                             num_key_value_heads=2, head_dim=8),
    # llama3 rope scaling over a 64-token original context, GQA 4 on 2, no biases.
    "llama3": TINY_LLAMA,
    # Llama with attention_bias (q/k/v/o biases) and rms_norm_eps 1e-5.
    "llama-bias": TINY_LLAMA.replace(attention_bias=True, rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def saved(request, tmp_path_factory):
    """(config, transformers model, HF directory written by save_pretrained)."""
    config = STUDENTS[request.param]
    model = hf_student(config)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return config, model, path


def test_logits_match_transformers(saved):
    """The checkpoint loaded by load_pretrained gives transformers' logits; 80 tokens run past the llama3
    variant's original 64-token context, so its low-frequency (divided) and blended bands both matter."""
    config, model, path = saved
    loaded_config, params = dsj.load_pretrained(path)
    assert loaded_config == config
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 80))
    want = torch_logits(model, tokens)
    got = np.asarray(dsj.Transformer(loaded_config).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("name", ["qwen2-tied-headdim", "llama3"])
def test_blockwise_attention_matches_transformers(name, tmp_path):
    """The blockwise core with grouped heads (groups of 3 and of 2; blocks of 16 over 80 tokens) against
    transformers."""
    config = STUDENTS[name]
    model = hf_student(config)
    model.save_pretrained(tmp_path)
    config, params = dsj.load_pretrained(tmp_path)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 80))
    opts = dsj.ModelOptions(attention="blockwise", attention_block=16)
    got = np.asarray(dsj.Transformer(config, opts).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(got - torch_logits(model, tokens)).max() <= TOL


def test_llama3_inv_freq_matches_transformers():
    """Our llama3 frequencies equal transformers' for the released 8B/70B parameters (factor 8, low 1, high 4,
    original 8192, theta 500000, head dim 128), and all three bands occur (kept, blended, divided by 8)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = dsj.presets["r1-distill-llama-8b"]
    d = config.to_hf_dict()
    d.pop("rope_scaling")
    hf_cfg = LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    want, factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    got = rope_inv_freq(config)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    assert factor == 1.0
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ratio = plain / got
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 8.0).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


# Parameter counts of the releases: the safetensors index's total_size / 2 (bf16) of each released checkpoint;
# each also equals the architecture formula below.
RELEASED_PARAMS = {
    "r1-distill-qwen-1.5b": 1_777_088_000,  # 3.55 GB model.safetensors: Qwen2.5-Math-1.5B with an untied head
    "r1-distill-qwen-7b": 7_615_616_512,
    "r1-distill-qwen-14b": 14_770_033_664,
    "r1-distill-qwen-32b": 32_763_876_352,
    "r1-distill-llama-8b": 8_030_261_248,
    "r1-distill-llama-70b": 70_553_706_496,
}


def _formula(c: dsj.ModelConfig) -> int:
    """embedding + head (unless tied) + final norm + layers x (q, k, v, o, biases, SwiGLU, two norms)."""
    d, e, h, k, i = c.hidden_size, c.attn_head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    attn = d * h * e + 2 * d * k * e + h * e * d + (h * e + 2 * k * e if c.qkv_bias else 0)
    layer = attn + 3 * d * i + 2 * d
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + d + c.num_hidden_layers * layer


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_preset_param_counts_match_releases(name):
    config = dsj.presets[name]
    counts = param_counts(config)
    assert counts == {"main": RELEASED_PARAMS[name]}
    assert _formula(config) == RELEASED_PARAMS[name]


def test_qwen_1_5b_tied_equals_qwen2_5_1_5b():
    """With the head tied, the 1.5B student is Qwen2.5-1.5B's 1,543,714,304 (its index: 3,087,428,608 bytes)."""
    config = dsj.presets["r1-distill-qwen-1.5b"].replace(tie_word_embeddings=True)
    assert param_counts(config)["main"] == 1_543_714_304


# The released DeepSeek-R1-Distill-Qwen-1.5B config.json (transformers 4.48 era), every field.
QWEN_1_5B_CONFIG_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_released_config_json_reads_as_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_1_5B_CONFIG_JSON))
    assert dsj.ModelConfig.from_pretrained(tmp_path) == dsj.presets["r1-distill-qwen-1.5b"]


def test_config_json_round_trip_and_errors(tmp_path):
    """to_hf_dict -> from_hf_dict gives the same config; unsupported student features fail by name."""
    for config in (*STUDENTS.values(), *(dsj.presets[n] for n in RELEASED_PARAMS)):
        assert dsj.ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    d = TINY_QWEN2.to_hf_dict()
    with pytest.raises(dsj.ConfigError, match="num_key_value_heads"):
        dsj.ModelConfig.from_hf_dict({**d, "num_key_value_heads": 3}, source="x/config.json")
    with pytest.raises(dsj.ConfigError, match="use_sliding_window"):
        dsj.ModelConfig.from_hf_dict({**d, "use_sliding_window": True})
    with pytest.raises(dsj.ConfigError, match="rope_scaling.type"):
        dsj.ModelConfig.from_hf_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None})


# ----- inference: GQA KV cache, generate, chat -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["qwen2-tied-headdim", "llama3"])
def sharp(request, tmp_path_factory):
    """A student with sharper random weights (std 0.1: greedy argmaxes far from ties), loaded from its HF dir."""
    config = STUDENTS[request.param]
    model = hf_student(config, seed=3, init_std=0.1)
    path = str(tmp_path_factory.mktemp("sharp-" + request.param))
    model.save_pretrained(path)
    config, params = dsj.load_pretrained(path)
    return config, params, model, path


def test_decode_equals_full_forward(sharp):
    """Prefill 3 tokens, then decode one at a time over the GQA cache: every position's logits equal the full
    forward's (70 positions: past the llama3 variant's original context)."""
    from deepseek_jax.inference import steps as decode
    from deepseek_jax.layers import kv_cache as kvcache

    config, params, _, _ = sharp
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 70), 0, config.vocab_size)
    full = np.asarray(jax.jit(dsj.Transformer(config).apply)({"params": params}, tokens))
    cached = np.asarray(decode.decode_all_positions(params, tokens, config=config, prefill_len=3))
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
    cache = kvcache.init_cache(config, 2, 128)
    # keys and values of K heads x E dims per layer: 2 * 2 * E values per token and layer
    leaves = cache["main"]["dense_layers"]
    shape = (config.num_hidden_layers, 2, 128, config.num_key_value_heads, config.attn_head_dim)
    assert leaves["k"].shape == leaves["v"].shape == shape
    per_token = kvcache.cache_bytes_per_token(config, "float32")
    assert per_token == 2 * config.num_key_value_heads * config.attn_head_dim * config.num_hidden_layers * 4


def test_greedy_generate_matches_transformers(sharp):
    """Batched greedy generation (prompts of 11, 1 and 7 tokens, right-padded) gives transformers' greedy tokens."""
    config, params, model, _ = sharp
    prompts = [[5, 17, 300, 2, 9, 44, 1, 8, 77, 3, 120], [3], [250, 11, 60, 2, 7, 7, 100]]
    ours = dsj.generate(config, params, prompts, max_new_tokens=8, eos_token_id=None)
    for prompt, got in zip(prompts, ours.tokens):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_chat_uses_the_r1_template(sharp, tmp_path):
    """A student's chat session opens the reasoning (``<｜Assistant｜><think>\\n``) and generates from it."""
    from tiny_inference import word_tokenizer

    from deepseek_jax.data import chat_template as chat
    from deepseek_jax.data.tokenizer import load_tokenizer
    from deepseek_jax.inference.chat import ChatSession

    config, params, _, _ = sharp
    assert chat.default_style(config) == "r1"
    word_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    session = ChatSession(config, params, tok, generate_kwargs=dict(max_new_tokens=5, eos_token_id=None))
    result = session.send("w5 w6")
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>w5 w6<｜Assistant｜><think>\n", add_bos=False)
    assert session.prompt_ids()[: len(prompt)] == prompt
    want = dsj.generate(config, params, [prompt], max_new_tokens=5, eos_token_id=None)
    assert result.tokens == want.tokens


# ----- convert / export --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_export_round_trip_bit_exact(saved, dtype, tmp_path):
    """HF -> Orbax (``convert``) -> HF (``export``) gives back every tensor bit for bit (biases included; a tied
    model writes no lm_head); the Orbax directory loads to transformers' logits, and transformers loads the
    export."""
    from convert_fixtures import read_all
    from transformers import AutoModelForCausalLM

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import export

    config, model, path = saved
    src, dst, out = str(tmp_path / "hf"), str(tmp_path / "orbax"), str(tmp_path / "back")
    model.to(dtype).save_pretrained(src, max_shard_size="100KB")
    model.float()
    convert(src, dst, dtype="float32" if dtype == torch.float32 else "bfloat16", progress=False)
    export(dst, out, progress=False)
    back = read_all(out)
    original = read_all(src)
    assert set(back) == set(original) and ("lm_head.weight" in back) == (not config.tie_word_embeddings)
    for key, x in original.items():
        assert back[key].dtype == x.dtype and torch.equal(back[key], x), key
    if dtype == torch.float32:
        tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 20))
        loaded, params = dsj.load_pretrained(dst)
        got = np.asarray(dsj.Transformer(loaded).apply({"params": params}, jnp.asarray(tokens)))
        assert np.abs(got - torch_logits(model, tokens)).max() <= TOL
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        # the same weights (checked above); only the attention kernel transformers picks on load differs
        np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens), atol=1e-6, rtol=0)


def test_info_shows_student_counts(capsys):
    from deepseek_jax.cli import main

    assert main(["info", "r1-distill-llama-8b"]) == 0
    out = capsys.readouterr().out
    assert "params (main)         8,030,261,248" in out
    # 8 key/value heads x 128 x 2 (k and v) x 32 layers = 65,536 values per token
    assert "KV cache / token      2048 values x 32 layers = 65,536 values" in out
