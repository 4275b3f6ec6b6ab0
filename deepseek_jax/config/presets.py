"""Named configs: DeepSeek's released models (``config.json`` values), the R1-Distill students, and tiny presets
with every feature of the real models for tests and the quickstart."""

from __future__ import annotations

from typing import Iterator

from deepseek_jax.config.model import CSA, HCA, SWA, ModelConfig, RopeScaling

_V2_ROPE = RopeScaling(factor=40.0, mscale=0.707, mscale_all_dim=0.707)

DEEPSEEK_V3 = ModelConfig()  # the dataclass defaults are V3's published config.json
# V3's weights plus a lightning indexer per layer (64 heads x 128, top-2048): DeepSeek-V3.2(-Exp)'s config.json.
DEEPSEEK_V32 = DEEPSEEK_V3.replace(model_type="deepseek_v32", index_topk=2048, index_head_dim=128, index_n_heads=64)

DEEPSEEK_V2_LITE = ModelConfig(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=None, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
    topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0, rope_scaling=_V2_ROPE,
    bos_token_id=100000, eos_token_id=100001,
)

DEEPSEEK_V2 = DEEPSEEK_V2_LITE.replace(
    hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
    num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160,
    topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0, aux_loss_alpha=0.003,
)

# DeepSeek-V4-Flash: transformers' DeepseekV4Config defaults (284B; 43 layers: 2 HCA, then CSA / HCA alternating;
# the first 3 MoE layers hash-routed). V4-Pro (~1.6T) as its public model card describes it: 61 layers, hidden 7168,
# 128 heads x 512, q-LoRA 1536, 16 output groups, 384 routed experts of width 3072, CSA's indexer top-1024, YaRN x16
# over a 64k base on the compressed branches; the fields the card does not give keep Flash's values.
DEEPSEEK_V4_FLASH = ModelConfig.from_hf_dict({"model_type": "deepseek_v4"}, source="DeepseekV4Config defaults")
DEEPSEEK_V4_PRO = ModelConfig.from_hf_dict(
    {"model_type": "deepseek_v4", "num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128,
     "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024, "n_routed_experts": 384, "moe_intermediate_size": 3072,
     "index_topk": 1024, "rope_parameters": {"rope_type": "yarn", "factor": 16.0,
                                             "original_max_position_embeddings": 65536}},
    source="DeepSeek-V4-Pro model card")

# Tiny presets: every feature of the real models, small enough for CPU tests and the quickstart.
TINY_V3 = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=4096,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024, mscale=1.0, mscale_all_dim=1.0),
)
# The main job's model (`deepseek-jax train` on the built-in arithmetic data): tiny-v3 with the 18-id
# vocabulary padded to 32 and fewer, wider experts (8 of width 64, 2 per token): on this task it reaches 80%+
# exact answers several times sooner than 16 narrow experts (bench/RESULTS.md).
TINY_V3_ARITH = TINY_V3.replace(vocab_size=32, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
# Tiny V4: the three attention kinds (HCA, CSA with an indexer that picks 3 of the pooled entries, and a
# sliding-window-only layer), hash and learned routing, 2 residual streams, an active SwiGLU clamp.
TINY_V4 = ModelConfig.from_hf_dict(
    {"model_type": "deepseek_v4", "vocab_size": 512, "hidden_size": 64, "moe_intermediate_size": 32,
     "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32, "q_lora_rank": 48, "partial_rotary_factor": 0.25,
     "n_routed_experts": 8, "num_experts_per_tok": 2, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 8,
     "compress_rates": {CSA: 2, HCA: 8}, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 3, "hc_mult": 2,
     "num_hash_layers": 1, "swiglu_limit": 1.0, "max_position_embeddings": 4096, "layer_types": [HCA, CSA, SWA, CSA],
     "num_nextn_predict_layers": 0}, source="tiny-v4")
TINY_V2 = TINY_V3.replace(
    model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024, mscale=0.707, mscale_all_dim=0.707),
    bos_token_id=None, eos_token_id=None,
)


# ----- the R1-Distill students (docs/reference.md, section 6) ----------------------------------------------
# Values of the released config.json files (deepseek-ai/DeepSeek-R1-Distill-*). The Qwen ones come from
# Qwen2.5-Math-1.5B / -7B and Qwen2.5-14B / -32B, the Llama ones from Llama-3.1-8B and Llama-3.3-70B-Instruct.
def dense_student(model_type: str, **fields) -> ModelConfig:
    """A dense student's config: the MLA / MoE / MTP fields switched off as ``from_hf_dict`` does."""
    fields.setdefault("max_position_embeddings", 131072)
    return ModelConfig(model_type=model_type, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0,
                       num_nextn_predict_layers=0, q_lora_rank=None, rope_interleave=False, **fields)


_QWEN_MATH = dict(vocab_size=151936, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
                  bos_token_id=151643, eos_token_id=151643)
R1_DISTILL_QWEN_1_5B = dense_student(
    "qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, **_QWEN_MATH)  # untied head (its base Qwen2.5-Math-1.5B ties it)
R1_DISTILL_QWEN_7B = dense_student(
    "qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, **{**_QWEN_MATH, "vocab_size": 152064})
R1_DISTILL_QWEN_14B = dense_student(
    "qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-5,
    bos_token_id=151643, eos_token_id=151643)
R1_DISTILL_QWEN_32B = R1_DISTILL_QWEN_14B.replace(intermediate_size=27648, num_hidden_layers=64)
_LLAMA3_ROPE = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
R1_DISTILL_LLAMA_8B = dense_student(
    "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
    rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
R1_DISTILL_LLAMA_70B = R1_DISTILL_LLAMA_8B.replace(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
# Tiny students for tests and the quickstart: GQA (4 query heads on 2 key heads), q/k/v bias / llama3 rope.
TINY_QWEN2 = dense_student(
    "qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
    bos_token_id=None, eos_token_id=None)
TINY_LLAMA = TINY_QWEN2.replace(model_type="llama", rope_scaling=RopeScaling(
    type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))


class _Presets(dict):
    def __missing__(self, key):
        raise KeyError(f"unknown preset {key!r}; available: {sorted(self)}")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(dict.keys(self)))


presets: dict[str, ModelConfig] = _Presets(
    {
        "deepseek-v2-lite": DEEPSEEK_V2_LITE,
        "deepseek-v2": DEEPSEEK_V2,
        "deepseek-v3": DEEPSEEK_V3,
        "deepseek-r1": DEEPSEEK_V3,
        "deepseek-v3.1": DEEPSEEK_V3,
        "deepseek-v3.2": DEEPSEEK_V32,
        "deepseek-v4-flash": DEEPSEEK_V4_FLASH,
        "deepseek-v4-pro": DEEPSEEK_V4_PRO,
        "tiny-v3": TINY_V3,
        "tiny-v3-arith": TINY_V3_ARITH,
        "tiny-v2": TINY_V2,
        "tiny-v4": TINY_V4,
        "r1-distill-qwen-1.5b": R1_DISTILL_QWEN_1_5B,
        "r1-distill-qwen-7b": R1_DISTILL_QWEN_7B,
        "r1-distill-qwen-14b": R1_DISTILL_QWEN_14B,
        "r1-distill-qwen-32b": R1_DISTILL_QWEN_32B,
        "r1-distill-llama-8b": R1_DISTILL_LLAMA_8B,
        "r1-distill-llama-70b": R1_DISTILL_LLAMA_70B,
        "tiny-qwen2": TINY_QWEN2,
        "tiny-llama": TINY_LLAMA,
    }
)
