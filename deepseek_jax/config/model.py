"""Model configuration: one frozen dataclass whose field names are the HF ``config.json`` names.

Only architecture lives here. Runtime choices (compute dtype, remat, MoE dispatch, matmul recipe) are in
``config/options.py`` so that one checkpoint's config never changes with how it is run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

ROUTER_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
DENSE_ONLY_FIELDS = ("head_dim", "mlp_bias", "use_sliding_window")  # Qwen2 / Llama fields, not in DeepSeek's
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
INDEXER_FIELDS = ("index_topk", "index_head_dim", "index_n_heads")  # DeepSeek-V3.2's sparse attention (DSA)
# DeepSeek-V4: attention over a sliding window plus compressed entries (CSA / HCA), hyper-connections, hash MoE.
V4_MODEL_TYPES = ("deepseek_v4",)
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
V4_LAYER_TYPES = (SWA, CSA, HCA)
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
# Params kept in fp32 whatever dtype the rest is cast to: the routers' correction bias, V4's token -> experts table
# (integers stored as fp32; bf16 would round expert ids above 256).
FP32_LEAVES = ("e_score_correction_bias", "tid2eid")
V4_FIELDS = ("o_groups", "o_lora_rank", "sliding_window", "layer_types", "mlp_layer_types", "compress_rates",
             "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit")
# The R1-Distill students: dense decoders with grouped-query attention (docs/reference.md, section 6).
DENSE_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_MODEL_TYPES = MLA_MODEL_TYPES + V4_MODEL_TYPES + DENSE_MODEL_TYPES
ROPE_TYPES = {"deepseek_v2": ("yarn",), "deepseek_v3": ("yarn",), "deepseek_v32": ("yarn",), "deepseek_v4": ("yarn",),
              "qwen2": ("llama3",), "llama": ("llama3",)}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field, the value and what was expected."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN or llama3 parameters (``rope_scaling`` / ``rope_parameters`` in config.json).

    ``type="llama3"`` (Llama-3.1/3.3, so R1-Distill-Llama) uses ``factor``, ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_position_embeddings``; the beta / mscale fields are YaRN's.

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
    low_freq_factor: Optional[float] = None  # llama3
    high_freq_factor: Optional[float] = None  # llama3

    def to_hf_dict(self, rope_theta: float) -> dict:
        if self.type == "llama3":
            return {"rope_type": "llama3", "type": "llama3", "rope_theta": rope_theta, "factor": self.factor,
                    "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
                    "original_max_position_embeddings": self.original_max_position_embeddings}
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
    """Architecture of a DeepSeek V2 / V2-Lite / V3 / R1 model, or of an R1-Distill student (``model_type``
    "qwen2" / "llama": dense layers with grouped-query attention; the MLA and MoE fields are then unused).
    Field names follow HF ``config.json``."""

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
    # DSA (deepseek_v32 only): the lightning indexer's heads and head dim, and the keys each query attends to
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    # DeepSeek-V4 (deepseek_v4 only; ``head_dim`` and ``num_key_value_heads`` = 1 are the shared K=V head's). The
    # released layout of each layer: its attention kind (``layer_types``) and its MoE router (``mlp_layer_types``);
    # None: transformers' defaults for ``num_hidden_layers`` (filled in by ``__post_init__``).
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: Optional[tuple] = None
    mlp_layer_types: Optional[tuple] = None
    compress_rates: tuple = ((CSA, 4), (HCA, 128))  # config.json's dict, as sorted pairs (hashable)
    compress_rope_theta: float = 160000.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: Optional[float] = None  # clamp of the experts' gate (above) and up (both sides) projections
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = RopeScaling(mscale=1.0, mscale_all_dim=1.0)
    rope_interleave: bool = True  # rope on pairs (x0, x1), (x2, x3)... as released; False: halves (V3, students)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # dense students (qwen2 / llama)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    mlp_bias: bool = False
    use_sliding_window: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        if self.model_type in V4_MODEL_TYPES:
            _v4_defaults(self)
        _validate(self)

    # ----- derived values -------------------------------------------------------------------------
    @property
    def uses_mla(self) -> bool:
        """DeepSeek's latent attention (True) or a dense student's grouped-query attention (False)."""
        return self.model_type in MLA_MODEL_TYPES

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2: every MLA layer has a lightning indexer and attends to its top ``index_topk`` keys."""
        return self.model_type == "deepseek_v32"

    @property
    def is_v4(self) -> bool:
        """DeepSeek-V4: a shared K=V head over a sliding window plus compressed entries, hyper-connections."""
        return self.model_type in V4_MODEL_TYPES

    @property
    def mtp_modules(self) -> int:
        """MTP modules the model builds: ``num_nextn_predict_layers``, but none for V4 yet (its checkpoint's MTP
        tensors are skipped on load, as transformers does)."""
        return 0 if self.is_v4 else self.num_nextn_predict_layers

    def compress_rate(self, layer_type: str) -> int:
        """Source tokens per compressed entry of a V4 attention kind (0 for sliding-window-only layers)."""
        return dict(self.compress_rates).get(layer_type, 0) if layer_type != SWA else 0

    @property
    def attn_head_dim(self) -> int:
        """A dense student's per-head q/k/v width."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Dims rope rotates per head: MLA's (and V4's) rope part, or a dense student's whole head."""
        return self.qk_rope_head_dim if self.uses_mla or self.is_v4 else self.attn_head_dim

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections carry a bias: always in Qwen2, ``attention_bias`` in Llama (o_proj too)."""
        return self.model_type == "qwen2" or (self.model_type == "llama" and self.attention_bias)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: MLA's latent ``c_kv`` plus the shared rope key (absorbed path),
        or a dense student's keys and values (``2 * num_key_value_heads * head_dim``)."""
        if not self.uses_mla:
            return 2 * self.num_key_value_heads * self.attn_head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` whenever YaRN is on.

        The official inference code applies the YaRN factor only when ``max_seq_len`` exceeds the original
        context; transformers applies it whenever ``rope_type == "yarn"``. We follow transformers (parity).
        Dense students: ``head_dim**-0.5`` (llama3 rope scaling leaves it alone).
        """
        if not self.uses_mla:
            return self.attn_head_dim**-0.5
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
        """DeepSeek's rule: MoE iff ``idx >= first_k_dense_replace and idx % moe_layer_freq == 0`` (V4: every
        layer)."""
        if self.is_v4:
            return True
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def layer_runs(self) -> tuple[tuple[str, int, int], ...]:
        """Contiguous runs of same-kind layers as ``(name, start, length)``; each run is one ``nn.scan``.

        The released models have one dense run then one MoE run (``dense_layers``, ``moe_layers``); other
        ``moe_layer_freq`` values give several runs, numbered per kind. V4's runs are layers of one attention kind
        and one router, named ``{moe|hash}_{csa|hca|swa}_{first layer}``: the learned-router runs start "moe".
        """
        if self.is_v4:
            short = {CSA: "csa", HCA: "hca", SWA: "swa"}
            kinds = [f"{'hash' if m == 'hash_moe' else 'moe'}_{short[a]}"
                     for a, m in zip(self.layer_types, self.mlp_layer_types)]
            v4_runs: list[tuple[str, int, int]] = []
            for i, kind in enumerate(kinds):
                if v4_runs and v4_runs[-1][0].rsplit("_", 1)[0] == kind:
                    v4_runs[-1] = (v4_runs[-1][0], v4_runs[-1][1], v4_runs[-1][2] + 1)
                else:
                    v4_runs.append((f"{kind}_{i}", i, 1))
            return tuple(v4_runs)
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
        if model_type in V4_MODEL_TYPES:
            return _v4_from_hf_dict(cls, d, source)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in names and key not in ("rope_scaling", "rope_theta") + V4_FIELDS:
                kwargs[key] = value
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if model_type == "deepseek_v2":
            # V2 configs omit the V3-only fields; their defaults must not leak in.
            kwargs.setdefault("num_nextn_predict_layers", 0)
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
        if model_type in MLA_MODEL_TYPES:
            for key in DENSE_ONLY_FIELDS:  # transformers' V3 config sets head_dim to the rope part; these
                kwargs.pop(key, None)  # fields belong to the dense students only
        if model_type in DENSE_MODEL_TYPES:
            # A dense student: every layer a dense MLP, no MTP; rope pairs the two halves of each head
            # (transformers' rotate_half), which is how these checkpoints were trained.
            kwargs.update(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0,
                          num_nextn_predict_layers=0, rope_interleave=False, q_lora_rank=None)
            heads = kwargs.get("num_attention_heads") or 1
            if kwargs.get("head_dim") in (None, kwargs.get("hidden_size", 0) // heads):
                kwargs.pop("head_dim", None)  # the default: one config whether or not config.json spells it out
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
                rope_scaling = _rope_scaling(rope, rtype)
        elif rope is not None:
            raise ConfigError(f"{source}: field 'rope_scaling' must be a dict or null, found {type(rope).__name__}")
        kwargs["rope_scaling"] = rope_scaling
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        return _build(cls, kwargs, source)

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
        if self.is_v4:
            return _v4_hf_dict(self)
        if not self.uses_mla:
            return self._dense_hf_dict()
        for name in DENSE_ONLY_FIELDS + V4_FIELDS:  # transformers' DeepSeek configs set their own head_dim (a null
            d.pop(name)  # would win); V4's fields are not V2 / V3's
        d["architectures"] = [{"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}.get(
            self.model_type, "DeepseekV2ForCausalLM")]
        if not self.has_indexer:
            for name in INDEXER_FIELDS:
                d.pop(name)
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        return d

    def _dense_hf_dict(self) -> dict[str, Any]:
        """The config.json of a Qwen2 / Llama checkpoint (only the fields those architectures have)."""
        names = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                 "rope_theta", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id")
        d = {n: getattr(self, n) for n in names}
        d["head_dim"] = self.attn_head_dim
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
            d["architectures"] = ["LlamaForCausalLM"]
        else:
            d.update(use_sliding_window=False, sliding_window=None)
            d["architectures"] = ["Qwen2ForCausalLM"]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf_dict(self.rope_theta)
        d["rope_parameters"] = rope if self.rope_scaling is None else d["rope_scaling"]
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


def _rope_scaling(rope: dict, rope_type: str) -> RopeScaling:
    """A ``rope_parameters`` / ``rope_scaling`` dict -> ``RopeScaling`` (its known fields; a null beta_* means YaRN's
    default, as transformers reads them with ``or``)."""
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    rs = {k: v for k, v in rope.items() if k in known and not (v is None and k.startswith("beta_"))}
    return RopeScaling(**{**rs, "type": rope_type})


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
    need(c.hidden_act == "silu", "hidden_act", "'silu'")
    need(c.rms_norm_eps > 0, "rms_norm_eps", "a positive number")
    if c.is_v4:
        _validate_v4(c)
        return
    if not c.uses_mla:
        _validate_dense(c)
        return
    need(c.num_key_value_heads == c.num_attention_heads, "num_key_value_heads",
         f"equal to num_attention_heads={c.num_attention_heads} (MLA has no grouped KV heads)")
    need(isinstance(c.rope_interleave, bool), "rope_interleave", "true or false")
    need(c.rope_interleave or c.model_type == "deepseek_v3", "rope_interleave",
         "true for deepseek_v2 / v32 (their checkpoints rotate interleaved pairs; only V3 configs may select halves)")
    if c.has_indexer:
        for name in INDEXER_FIELDS:
            v = getattr(c, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "a positive integer")
        need(c.q_lora_rank is not None, "q_lora_rank", "a positive integer (the indexer reads the query latent)")
        need(c.index_head_dim % 2 == 0 and c.index_head_dim >= c.qk_rope_head_dim, "index_head_dim",
             f"an even number >= qk_rope_head_dim={c.qk_rope_head_dim} (rope turns its first dims)")
    need(not c.attention_bias, "attention_bias", "false (no released DeepSeek model uses attention biases)")
    need(not c.tie_word_embeddings, "tie_word_embeddings", "false (DeepSeek models have an untied head)")
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


def _validate_dense(c: ModelConfig) -> None:
    def need(cond: bool, field: str, expected: str):
        if not cond:
            raise ConfigError(f"field '{field}' = {getattr(c, field)!r}: expected {expected}")

    h, hk = c.num_attention_heads, c.num_key_value_heads
    need(isinstance(hk, int) and hk > 0 and h % hk == 0, "num_key_value_heads",
         f"a positive divisor of num_attention_heads={h} (grouped-query attention)")
    need(c.head_dim is not None or c.hidden_size % h == 0, "hidden_size",
         f"a multiple of num_attention_heads={h} (or give head_dim)")
    need(c.attn_head_dim % 2 == 0, "head_dim", "an even number (rope rotates pairs)")
    need(c.intermediate_size > 0, "intermediate_size", "a positive integer")
    need(c.n_routed_experts == 0, "n_routed_experts", f"0 ({c.model_type} models are dense)")
    need(c.num_nextn_predict_layers == 0, "num_nextn_predict_layers", f"0 ({c.model_type} models have no MTP)")
    need(not c.rope_interleave, "rope_interleave", f"false ({c.model_type} rotates the two halves of each head)")
    need(not c.mlp_bias, "mlp_bias", "false (no released R1-Distill model has MLP biases)")
    need(not c.use_sliding_window, "use_sliding_window",
         "false (sliding-window layers are not implemented; no R1-Distill release uses them)")
    need(c.model_type == "llama" or not c.attention_bias, "attention_bias",
         "false for qwen2 (its q/k/v biases are implied by the architecture)")
    rs = c.rope_scaling
    if rs is not None:
        if rs.type not in ROPE_TYPES[c.model_type]:
            raise ConfigError(f"field 'rope_scaling.type' = {rs.type!r}: expected one of {ROPE_TYPES[c.model_type]} "
                              f"for {c.model_type} (or no rope_scaling)")
        if None in (rs.low_freq_factor, rs.high_freq_factor) or not rs.high_freq_factor > rs.low_freq_factor > 0 \
                or not rs.factor >= 1 or rs.original_max_position_embeddings <= 0:
            raise ConfigError(f"field 'rope_scaling' = {rs!r}: llama3 needs factor >= 1, "
                              f"high_freq_factor > low_freq_factor > 0 and a positive original length")


# ----- DeepSeek-V4 ---------------------------------------------------------------------------------------------
# transformers' ``DeepseekV4Config`` defaults (V4-Flash): what a V4 config.json means where it leaves a field out.
V4_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
    num_key_value_heads=1, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256,
    n_shared_experts=1, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
    max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024,
    index_n_heads=64, index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu",
    attention_bias=False,
)
# Fields of our dataclass that V4 does not have; fixed so that one V4 config has one value of each.
_V4_FIXED: dict[str, Any] = dict(
    intermediate_size=0, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=0,
    moe_layer_freq=1, topk_method="noaux_tc", n_group=1, topk_group=1, rope_interleave=True, mlp_bias=False,
    use_sliding_window=False,
)
_V4_DEFAULT_HASH_LAYERS = 3
_LEGACY_RATE = {0: SWA, 4: CSA, 128: HCA}


def v4_default_layer_types(n: int) -> tuple[str, ...]:
    """transformers' default schedule: two HCA layers, then CSA / HCA alternating (CSA on odd places)."""
    return (HCA,) * min(n, 2) + tuple(CSA if i % 2 else HCA for i in range(max(n - 2, 0)))


def _v4_defaults(c: ModelConfig) -> None:
    """Fill the per-layer schedules (None: transformers' defaults) and make the container fields hashable."""
    n = c.num_hidden_layers if isinstance(c.num_hidden_layers, int) else 0
    layer_types = c.layer_types if c.layer_types is not None else v4_default_layer_types(n)
    mlp_types = c.mlp_layer_types if c.mlp_layer_types is not None else (
        ("hash_moe",) * min(n, _V4_DEFAULT_HASH_LAYERS) + ("moe",) * max(0, n - _V4_DEFAULT_HASH_LAYERS))
    rates = c.compress_rates.items() if isinstance(c.compress_rates, dict) else c.compress_rates
    object.__setattr__(c, "layer_types", tuple(layer_types))
    object.__setattr__(c, "mlp_layer_types", tuple(mlp_types))
    object.__setattr__(c, "compress_rates", tuple(sorted((str(k), int(v)) for k, v in rates)))


def _v4_from_hf_dict(cls, d: dict[str, Any], source: str) -> ModelConfig:
    """A ``deepseek_v4`` config.json (transformers' names, its legacy keys included) -> ModelConfig."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {**V4_HF_DEFAULTS, **_V4_FIXED, "model_type": "deepseek_v4"}
    skip = set(_V4_FIXED) | {"rope_scaling", "rope_theta", "compress_rope_theta", "intermediate_size",
                             "qk_rope_head_dim"}
    for key, value in d.items():
        if key in names and key not in skip and value is not None:
            kwargs[key] = value
    n = kwargs["num_hidden_layers"]
    rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
    if d.get("compress_rate_csa") is not None:
        rates[CSA] = d["compress_rate_csa"]
    if d.get("compress_rate_hca") is not None:
        rates[HCA] = d["compress_rate_hca"]
    kwargs["compress_rates"] = rates
    if d.get("layer_types") is None and d.get("compress_ratios") is not None:
        try:
            kwargs["layer_types"] = [_LEGACY_RATE[r] for r in d["compress_ratios"]]
        except KeyError as e:
            raise ConfigError(f"{source}: field 'compress_ratios' has {e.args[0]!r}: expected 0, 4 or 128") from None
    if d.get("mlp_layer_types") is None and d.get("num_hash_layers") is not None:
        h = d["num_hash_layers"]
        kwargs["mlp_layer_types"] = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    for key in ("layer_types", "mlp_layer_types"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])[:n]
    head_dim = kwargs["head_dim"]
    factor = d.get("partial_rotary_factor")
    if factor is None and d.get("qk_rope_head_dim") is not None:
        factor = d["qk_rope_head_dim"] / head_dim
    kwargs["qk_rope_head_dim"] = int(head_dim * (factor if factor is not None else 64 / 512))
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' must be a dict or null, found {type(rope).__name__}")
    main, compress = rope.get("main"), rope.get("compress")
    if not (isinstance(main, dict) and isinstance(compress, dict)):
        # A flat dict: YaRN's fields (if any) are the compressed branches'; the thetas are the top-level ones.
        flat = {k: v for k, v in rope.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": d.get("rope_theta", V4_HF_DEFAULTS["rope_theta"])}
        compress = {**flat, "rope_theta": d.get("compress_rope_theta", V4_HF_DEFAULTS["compress_rope_theta"])}
    main_type = main.get("rope_type", main.get("type", "default"))
    if main_type != "default":
        raise ConfigError(f"{source}: field 'rope_parameters.main.rope_type' = {main_type!r}: expected 'default' "
                          "(transformers scales only the compressed branches' rope)")
    kwargs["rope_theta"] = float(main.get("rope_theta", V4_HF_DEFAULTS["rope_theta"]))
    kwargs["compress_rope_theta"] = float(compress.get("rope_theta", V4_HF_DEFAULTS["compress_rope_theta"]))
    ctype = compress.get("rope_type", compress.get("type", "default"))
    kwargs["rope_scaling"] = None
    if ctype not in ("default", None):
        # transformers' default attention_factor for V4's compressed YaRN is 1.0
        kwargs["rope_scaling"] = _rope_scaling({"attention_factor": 1.0, **compress} if ctype == "yarn" else compress,
                                               ctype)
    return _build(cls, kwargs, source)


def _build(cls, kwargs: dict[str, Any], source: str) -> ModelConfig:
    """The config from config.json's values (a list of eos ids: the first), errors naming ``source``."""
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _v4_hf_dict(c: ModelConfig) -> dict[str, Any]:
    """A ``deepseek_v4`` config.json that transformers' ``DeepseekV4Config`` reads back to the same model."""
    d = {k: getattr(c, k) for k in V4_HF_DEFAULTS}
    d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"],
             layer_types=list(c.layer_types), mlp_layer_types=list(c.mlp_layer_types),
             compress_rates=dict(c.compress_rates), partial_rotary_factor=c.qk_rope_head_dim / c.head_dim)
    prf = d["partial_rotary_factor"]
    compress = {"rope_type": "default"} if c.rope_scaling is None else {
        k: v for k, v in c.rope_scaling.to_hf_dict(c.compress_rope_theta).items() if k != "type"}
    compress.update(rope_theta=c.compress_rope_theta, partial_rotary_factor=prf)
    d["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": prf},
                            "compress": compress}
    return d


def _validate_v4(c: ModelConfig) -> None:
    def need(cond: bool, field: str, expected: str):
        if not cond:
            raise ConfigError(f"field '{field}' = {getattr(c, field)!r}: expected {expected}")

    def positive(name):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "a positive integer")

    for name in ("head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "hc_mult",
                 "hc_sinkhorn_iters", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"):
        positive(name)
    need(c.num_key_value_heads == 1, "num_key_value_heads", "1 (V4 shares one K=V head among all query heads)")
    need(c.head_dim % 2 == 0 and 0 < c.qk_rope_head_dim <= c.head_dim, "qk_rope_head_dim",
         f"an even number between 2 and head_dim={c.head_dim} (partial_rotary_factor * head_dim)")
    need(c.num_attention_heads % c.o_groups == 0, "o_groups",
         f"a divisor of num_attention_heads={c.num_attention_heads} (the grouped output projection)")
    need(len(c.layer_types) == c.num_hidden_layers and all(t in V4_LAYER_TYPES for t in c.layer_types),
         "layer_types", f"{c.num_hidden_layers} entries from {V4_LAYER_TYPES}")
    need(len(c.mlp_layer_types) == c.num_hidden_layers and all(t in V4_MLP_LAYER_TYPES for t in c.mlp_layer_types),
         "mlp_layer_types", f"{c.num_hidden_layers} entries from {V4_MLP_LAYER_TYPES}")
    rates = dict(c.compress_rates)
    need(all(rates.get(t, 0) > 0 for t in set(c.layer_types) - {SWA}), "compress_rates",
         "a positive rate for every compressed layer type in layer_types")
    need(CSA not in c.layer_types or rates[CSA] >= 1, "compress_rates", "a CSA rate of at least 1")
    if CSA in c.layer_types:
        for name in INDEXER_FIELDS:
            positive(name)
        need(c.qk_rope_head_dim <= c.index_head_dim, "index_head_dim",
             f"at least qk_rope_head_dim={c.qk_rope_head_dim} (rope turns its last dims)")
    need(c.scoring_func in SCORING_FUNCS, "scoring_func", f"one of {SCORING_FUNCS}")
    need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
         f"at most n_routed_experts={c.n_routed_experts}")
    need(c.swiglu_limit is None or c.swiglu_limit > 0, "swiglu_limit", "null or a positive number")
    need(not c.tie_word_embeddings, "tie_word_embeddings", "false (V4 has an untied head)")
    if c.rope_scaling is not None and c.rope_scaling.type != "yarn":
        raise ConfigError(f"field 'rope_scaling.type' = {c.rope_scaling.type!r}: expected 'yarn' (or none) for "
                          "V4's compressed rope")
