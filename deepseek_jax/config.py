"""Model configuration: one frozen dataclass whose field names are the HF ``config.json`` names.

Only architecture lives here. Runtime choices (compute dtype, remat, MoE dispatch, matmul recipe) are in
``options.py`` so that one checkpoint's config never changes with how it is run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Optional

ROUTER_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what was expected."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` / ``rope_parameters`` in config.json).

    The optional fields are None when config.json leaves them out, and then mean what transformers makes of
    an absent key: no ``mscale_all_dim`` means no YaRN softmax-scale factor; ``attention_factor`` (the cos/sin
    multiplier) is derived from ``mscale`` / ``mscale_all_dim`` when both are given, else from ``factor``.
    """

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True  # floor/ceil the correction range (YaRN's default)

    def to_hf_dict(self, rope_theta: float) -> dict:
        d = {
            "rope_type": self.type,
            "type": self.type,
            "rope_theta": rope_theta,
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if not self.truncate:
            d["truncate"] = False
        return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek V2 / V2-Lite / V3 / R1 model. Field names follow HF ``config.json``."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    # MLA
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # MTP
    num_nextn_predict_layers: int = 1
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = RopeScaling(mscale=1.0, mscale_all_dim=1.0)
    rope_interleave: bool = True  # rope on pairs (x0, x1), (x2, x3)... as released; False: halves (V3 only)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        _validate(self)

    # ----- derived values -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer on the absorbed path: latent ``c_kv`` plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` whenever YaRN is on.

        The official inference code applies the YaRN factor only when ``max_seq_len`` exceeds the original
        context; transformers applies it whenever ``rope_type == "yarn"``. We follow transformers (parity).
        """
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def has_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE iff ``idx >= first_k_dense_replace and idx % moe_layer_freq == 0``."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def layer_runs(self) -> tuple[tuple[str, int, int], ...]:
        """Contiguous runs of same-kind layers as ``(name, start, length)``; each run is one ``nn.scan``.

        The released models have one dense run then one MoE run (``dense_layers``, ``moe_layers``); other
        ``moe_layer_freq`` values give several runs, numbered per kind.
        """
        kinds = ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]
        runs: list[tuple[str, int, int]] = []
        for i, kind in enumerate(kinds):
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((kind, i, 1))
        per_kind = {k: sum(1 for r in runs if r[0] == k) for k in ("dense", "moe")}
        seen = {"dense": 0, "moe": 0}
        named = []
        for kind, start, length in runs:
            name = f"{kind}_layers" if per_kind[kind] == 1 else f"{kind}_layers_{seen[kind]}"
            seen[kind] += 1
            named.append((name, start, length))
        return tuple(named)

    # ----- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a config.json dict (``rope_scaling`` of older files or ``rope_parameters`` of 5.x)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise ConfigError(
                f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in names and key not in ("rope_scaling", "rope_theta"):
                kwargs[key] = value
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if model_type == "deepseek_v2":
            # V2 configs omit the V3-only fields; their defaults must not leak in.
            kwargs.setdefault("num_nextn_predict_layers", 0)
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None and key in kwargs:
                kwargs[key] = 1
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        theta = d.get("rope_theta")
        rope_scaling = None
        if isinstance(rope, dict):
            theta = rope.get("rope_theta", theta)
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if rtype not in ("default", None):
                known = {f.name for f in dataclasses.fields(RopeScaling)}
                # A null beta_* means YaRN's default (transformers reads them with `or`).
                rs = {k: v for k, v in rope.items() if k in known and not (v is None and k.startswith("beta_"))}
                rs["type"] = rtype
                rope_scaling = RopeScaling(**rs)
        elif rope is not None:
            raise ConfigError(f"{source}: field 'rope_scaling' must be a dict or null, found {type(rope).__name__}")
        kwargs["rope_scaling"] = rope_scaling
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        return cls.from_hf_dict(read_config_json(file), source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers 5.x (and older readers of ``rope_scaling``) accept."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf_dict(self.rope_theta)
        d["rope_parameters"] = (
            {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling is None
            else self.rope_scaling.to_hf_dict(self.rope_theta)
        )
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def read_config_json(file: str) -> dict[str, Any]:
    """The raw dict of a config.json, with errors that name the file."""
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no config.json found")
    try:
        with open(file) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: not a JSON object")
    return d


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _validate(c: ModelConfig) -> None:
    def need(cond: bool, field: str, expected: str):
        if not cond:
            raise ConfigError(f"field '{field}' = {getattr(c, field)!r}: expected {expected}")

    if c.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"field 'model_type' = {c.model_type!r}: expected one of {SUPPORTED_MODEL_TYPES}")
    for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq",
    ):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "a positive integer")
    for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                 "first_k_dense_replace", "num_nextn_predict_layers", "num_experts_per_tok", "n_group",
                 "topk_group"):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "a non-negative integer")
    need(c.q_lora_rank is None or (isinstance(c.q_lora_rank, int) and c.q_lora_rank > 0), "q_lora_rank",
         "null or a positive integer")
    need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "an even number (rope rotates pairs)")
    need(c.num_key_value_heads == c.num_attention_heads, "num_key_value_heads",
         f"equal to num_attention_heads={c.num_attention_heads} (MLA has no grouped KV heads)")
    need(c.hidden_act == "silu", "hidden_act", "'silu'")
    need(isinstance(c.rope_interleave, bool), "rope_interleave", "true or false")
    need(c.rope_interleave or c.model_type == "deepseek_v3", "rope_interleave",
         "true for deepseek_v2 (V2 checkpoints rotate interleaved pairs; only V3 configs may select halves)")
    need(not c.attention_bias, "attention_bias", "false (no released DeepSeek model uses attention biases)")
    need(not c.tie_word_embeddings, "tie_word_embeddings", "false (DeepSeek models have an untied head)")
    need(c.rms_norm_eps > 0, "rms_norm_eps", "a positive number")
    need(c.first_k_dense_replace <= c.num_hidden_layers, "first_k_dense_replace",
         f"at most num_hidden_layers={c.num_hidden_layers}")
    has_moe = any(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) or (
        c.num_nextn_predict_layers > 0 and c.n_routed_experts > 0)
    if has_moe:
        need(c.topk_method in ROUTER_METHODS, "topk_method", f"one of {ROUTER_METHODS}")
        need(c.scoring_func in SCORING_FUNCS, "scoring_func", f"one of {SCORING_FUNCS}")
        need(c.moe_intermediate_size > 0, "moe_intermediate_size", "a positive integer")
        need(c.n_group >= 1 and c.n_routed_experts % c.n_group == 0, "n_group",
             f"a divisor of n_routed_experts={c.n_routed_experts}")
        need(1 <= c.topk_group <= c.n_group, "topk_group", f"between 1 and n_group={c.n_group}")
        per_group = c.n_routed_experts // c.n_group
        need(1 <= c.num_experts_per_tok <= c.topk_group * per_group, "num_experts_per_tok",
             f"between 1 and topk_group * experts per group = {c.topk_group * per_group}")
        if c.topk_method == "noaux_tc":
            need(per_group >= 2 or c.n_group == 1, "n_group",
                 "groups of at least 2 experts (noaux_tc scores a group by its top-2 sum)")
    if any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        need(c.intermediate_size > 0, "intermediate_size", "a positive integer (there are dense layers)")
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        if rs.type != "yarn":
            raise ConfigError(f"field 'rope_scaling.type' = {rs.type!r}: expected 'yarn' (or no rope_scaling)")
        if rs.factor is None or not (rs.factor >= 1 and rs.original_max_position_embeddings > 0):
            raise ConfigError(f"field 'rope_scaling' = {rs!r}: expected factor >= 1 and a positive original length")


# ----- presets ------------------------------------------------------------------------------------
_V2_ROPE = RopeScaling(factor=40.0, mscale=0.707, mscale_all_dim=0.707)

DEEPSEEK_V3 = ModelConfig()  # the dataclass defaults are V3's published config.json

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
TINY_V2 = TINY_V3.replace(
    model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024, mscale=0.707, mscale_all_dim=0.707),
    bos_token_id=None, eos_token_id=None,
)


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
        "tiny-v3": TINY_V3,
        "tiny-v3-arith": TINY_V3_ARITH,
        "tiny-v2": TINY_V2,
    }
)
