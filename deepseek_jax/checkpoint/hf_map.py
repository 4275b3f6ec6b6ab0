"""HF checkpoint layout <-> our params pytree (docs/reference.md, section 4).

``hf_tensor_map(config)`` is the one description of the mapping: for every leaf of our (scanned) params tree,
which HF tensors fill it, at which index of the stacked layer / expert dims, and how each is laid out
(``[out, in]`` PyTorch linears are transposed to ``[in, out]`` and split into heads). ``load_pretrained``,
the streaming converter and export all walk it, one source tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from deepseek_jax.config.model import CSA, SWA, ModelConfig
from deepseek_jax.models.v4 import run_kinds


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One leaf of our params tree and the HF tensors that fill it.

    path: the leaf's path in the params tree.
    shape: the leaf's full shape, stacked dims (layers, experts) first.
    sources: ``(hf_key, index)`` pairs; ``index`` addresses the stacked leading dims (``()`` when none).
    hf_shape: the shape every source has in the checkpoint.
    transpose: True for linear weights stored ``[out, in]``.
    keep_fp32: stored and kept in fp32 whatever the requested dtype (the router's correction bias).
    integer: an integer tensor in the checkpoint (V4's ``tid2eid`` table), held as fp32 values.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    hf_shape: tuple[int, ...]
    transpose: bool = False
    keep_fp32: bool = False
    integer: bool = False

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one source once in our layout (the leaf's shape without the stacked dims)."""
        return self.shape[len(self.sources[0][1]):]

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """One source tensor in HF layout -> our layout for its slot."""
        x = hf.T if self.transpose else hf
        return x.reshape(self.item_shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Inverse of ``to_ours`` for one slot (used by export)."""
        if self.transpose:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


def _layer_templates(c: ModelConfig, moe: bool):
    """Per-layer leaves: (path inside the block, HF suffix, our shape, HF shape, transpose)."""
    d, h, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
    qk, nv = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim
    t = [
        (("input_layernorm", "scale"), "input_layernorm.weight", (d,), (d,), False),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,), (d,), False),
    ]
    a = "self_attn"
    if not c.uses_mla:
        return t + _gqa_templates(c)
    if c.q_lora_rank is None:
        t.append(((a, "q_proj", "kernel"), f"{a}.q_proj.weight", (d, h, qk), (h * qk, d), True))
    else:
        q = c.q_lora_rank
        t += [
            ((a, "q_a_proj", "kernel"), f"{a}.q_a_proj.weight", (d, q), (q, d), True),
            ((a, "q_a_layernorm", "scale"), f"{a}.q_a_layernorm.weight", (q,), (q,), False),
            ((a, "q_b_proj", "kernel"), f"{a}.q_b_proj.weight", (q, h, qk), (h * qk, q), True),
        ]
    t += [
        ((a, "kv_a_proj_with_mqa", "kernel"), f"{a}.kv_a_proj_with_mqa.weight", (d, c.kv_cache_dim),
         (c.kv_cache_dim, d), True),
        ((a, "kv_a_layernorm", "scale"), f"{a}.kv_a_layernorm.weight", (r,), (r,), False),
        ((a, "kv_b_proj", "kernel"), f"{a}.kv_b_proj.weight", (r, h, nv), (h * nv, r), True),
        ((a, "o_proj", "kernel"), f"{a}.o_proj.weight", (h, c.v_head_dim, d), (d, h * c.v_head_dim), True),
    ]
    if c.has_indexer:  # DeepSeek-V3.2's lightning indexer (layers/indexer.py)
        hi, di, ix = c.index_n_heads, c.index_head_dim, f"{a}.indexer"
        t += [
            ((a, "indexer", "wq_b", "kernel"), f"{ix}.wq_b.weight", (c.q_lora_rank, hi, di),
             (hi * di, c.q_lora_rank), True),
            ((a, "indexer", "wk", "kernel"), f"{ix}.wk.weight", (d, di), (di, d), True),
            ((a, "indexer", "k_norm_scale"), f"{ix}.k_norm.weight", (di,), (di,), False),
            ((a, "indexer", "k_norm_bias"), f"{ix}.k_norm.bias", (di,), (di,), False),
            ((a, "indexer", "weights_proj"), f"{ix}.weights_proj.weight", (d, hi), (hi, d), True),
        ]
    if not moe:
        i = c.intermediate_size
        t += [
            (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (d, i), (i, d), True),
            (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (d, i), (i, d), True),
            (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (i, d), (d, i), True),
        ]
        return t
    e, i = c.n_routed_experts, c.moe_intermediate_size
    t.append((("mlp", "gate", "kernel"), "mlp.gate.weight", (d, e), (e, d), True))
    if c.has_correction_bias:
        t.append((("mlp", "gate", "e_score_correction_bias"), "mlp.gate.e_score_correction_bias", (e,), (e,), False))
    # Routed experts: one HF tensor per expert, "{e}" is filled in by the caller.
    t += [
        (("mlp", "experts", "gate_proj"), "mlp.experts.{e}.gate_proj.weight", (d, i), (i, d), True),
        (("mlp", "experts", "up_proj"), "mlp.experts.{e}.up_proj.weight", (d, i), (i, d), True),
        (("mlp", "experts", "down_proj"), "mlp.experts.{e}.down_proj.weight", (i, d), (d, i), True),
    ]
    if c.n_shared_experts > 0:
        s = c.n_shared_experts * i
        shared = ("mlp", "shared_experts")
        t += [
            (shared + ("gate_proj", "kernel"), "mlp.shared_experts.gate_proj.weight", (d, s), (s, d), True),
            (shared + ("up_proj", "kernel"), "mlp.shared_experts.up_proj.weight", (d, s), (s, d), True),
            (shared + ("down_proj", "kernel"), "mlp.shared_experts.down_proj.weight", (s, d), (d, s), True),
        ]
    return t


def _gqa_templates(c: ModelConfig):
    """A dense student's layer (Qwen2 / Llama): q/k/v/o projections (biases per ``config.qkv_bias``) and the
    dense MLP."""
    d, h, k, e, i, a = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim,
                        c.intermediate_size, "self_attn")
    t = []
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        t.append(((a, name, "kernel"), f"{a}.{name}.weight", (d, heads, e), (heads * e, d), True))
        if c.qkv_bias:
            t.append(((a, name, "bias"), f"{a}.{name}.bias", (heads, e), (heads * e,), False))
    t.append(((a, "o_proj", "kernel"), f"{a}.o_proj.weight", (h, e, d), (d, h * e), True))
    if c.model_type == "llama" and c.attention_bias:
        t.append(((a, "o_proj", "bias"), f"{a}.o_proj.bias", (d,), (d,), False))
    t += [
        (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (d, i), (i, d), True),
        (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (d, i), (i, d), True),
        (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (i, d), (d, i), True),
    ]
    return t


def _block_maps(c: ModelConfig, prefix: tuple[str, ...], layers: list[int], moe: bool, stacked: bool):
    out = []
    for path, suffix, shape, hf_shape, transpose in _layer_templates(c, moe):
        per_expert = "{e}" in suffix
        lead = ((len(layers),) if stacked else ()) + ((c.n_routed_experts,) if per_expert else ())
        sources = []
        for j, layer in enumerate(layers):
            base = f"model.layers.{layer}."
            li = (j,) if stacked else ()
            if per_expert:
                sources += [(base + suffix.format(e=e), li + (e,)) for e in range(c.n_routed_experts)]
            else:
                sources.append((base + suffix, li))
        out.append(TensorMap(prefix + path, lead + shape, tuple(sources), hf_shape, transpose,
                             keep_fp32=suffix.endswith("e_score_correction_bias")))
    return out


def hf_tensor_map(config: ModelConfig) -> list[TensorMap]:
    """Every leaf of the params tree with its HF sources (main model and MTP modules)."""
    c = config
    if c.is_v4:
        return _v4_maps(c)
    d, v = c.hidden_size, c.vocab_size
    maps = [
        TensorMap(("embed_tokens", "embedding"), (v, d), (("model.embed_tokens.weight", ()),), (v, d)),
        TensorMap(("norm", "scale"), (d,), (("model.norm.weight", ()),), (d,)),
    ]
    if not c.tie_word_embeddings:  # a tied head is the embedding (no lm_head.weight in the checkpoint)
        maps.append(TensorMap(("lm_head", "kernel"), (d, v), (("lm_head.weight", ()),), (v, d), transpose=True))
    for name, start, length in c.layer_runs:
        maps += _block_maps(c, (name,), list(range(start, start + length)), name.startswith("moe"), stacked=True)
    for k in range(c.num_nextn_predict_layers):
        idx = c.num_hidden_layers + k
        base, p = f"model.layers.{idx}.", (f"mtp_{k}",)
        maps += [
            TensorMap(p + ("enorm", "scale"), (d,), ((base + "enorm.weight", ()),), (d,)),
            TensorMap(p + ("hnorm", "scale"), (d,), ((base + "hnorm.weight", ()),), (d,)),
            TensorMap(p + ("eh_proj", "kernel"), (2 * d, d), ((base + "eh_proj.weight", ()),), (d, 2 * d), True),
            TensorMap(p + ("shared_head_norm", "scale"), (d,), ((base + "shared_head.norm.weight", ()),), (d,)),
        ]
        maps += _block_maps(c, p + ("block",), [idx], c.n_routed_experts > 0, stacked=False)
    return maps


def optional_hf_keys(config: ModelConfig) -> set[str]:
    """Keys a checkpoint may carry that we do not load: the MTP layers' copies of embedding and head, and a
    tied model's copy of its embedding as ``lm_head.weight``."""
    keys = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for k in range(config.num_nextn_predict_layers):
        base = f"model.layers.{config.num_hidden_layers + k}."
        keys |= {base + "embed_tokens.weight", base + "shared_head.head.weight"}
    return keys


def split_point(tm: TensorMap) -> int:
    """How many of our item dims come from the HF tensor's ``in`` dim (transposed linears)."""
    in_dim = tm.hf_shape[1]
    for n in range(len(tm.item_shape) + 1):
        if math.prod(tm.item_shape[:n]) == in_dim:
            return n
    raise ValueError(f"{tm.path}: item shape {tm.item_shape} does not split into in={in_dim} x out")


# ----- DeepSeek-V4 ---------------------------------------------------------------------------------------------
# V4's tensors go by DeepSeek's release names (``layers.{i}.attn.wq_a.weight``, ``embed.weight``, ``hc_head_fn``);
# transformers maps them onto its modules on load and back on save, where it keeps a ``model.`` prefix on some
# (``model.layers.{i}.attn.wq_a.weight``, ``model.embed_tokens.weight``, ``model.hc_head.hc_fn``) and names the
# attention's K=V norm ``attn.norm``; the release names a quantized weight's scale ``<name>.scale``, read here as
# ``<name>.weight_scale_inv``. ``canonical_v4_keys`` reads either spelling.
_V4_STYLE = re.compile(r"(^|\.)layers\.\d+\.(attn|ffn)\.|^(model\.)?hc_head")
_V4_TOP = {"model.embed_tokens.weight": "embed.weight", "embed_tokens.weight": "embed.weight",
           "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight", "model.hc_head.hc_fn": "hc_head_fn",
           "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}


def canonical_v4_keys(keys: list[str]) -> dict[str, str]:
    """``{name used by the map: name in the file}``: the identity unless the keys are V4's, whose spellings (see
    above) all become the release names."""
    if not any(_V4_STYLE.search(k) for k in keys):
        return {k: k for k in keys}
    out, have = {}, set(keys)
    for k in keys:
        name = _V4_TOP.get(k, k[len("model."):] if k.startswith("model.layers.") else k)
        name = re.sub(r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.", name)
        if k.endswith(".scale") and k[: -len("scale")] + "weight" in have:  # the release's block scales
            name = name[: -len("scale")] + "weight_scale_inv"
        out[name] = k
    return out


def _v4_compressor(prefix: str, path: tuple[str, ...], d: int, f: int, head: int, rate: int):
    return [
        (path + ("kv_proj", "kernel"), f"{prefix}.wkv.weight", (d, f), (f, d), True),
        (path + ("gate_proj", "kernel"), f"{prefix}.wgate.weight", (d, f), (f, d), True),
        (path + ("position_bias",), f"{prefix}.ape", (rate, f), (rate, f), False),
        (path + ("kv_norm", "scale"), f"{prefix}.norm.weight", (head,), (head,), False),
    ]


def _v4_layer_templates(c: ModelConfig, layer_type: str, hashed: bool):
    """One V4 layer's leaves: (path in the block, release suffix, our shape, its shape, transpose)."""
    d, h, dh, lq, g, r = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank
    n, per_group = c.hc_mult, c.num_attention_heads // c.o_groups * c.head_dim
    a = ("self_attn",)
    t = [(("input_layernorm", "scale"), "attn_norm.weight", (d,), (d,), False),
         (("post_attention_layernorm", "scale"), "ffn_norm.weight", (d,), (d,), False)]
    for ours, theirs in (("attn_hc", "hc_attn"), ("ffn_hc", "hc_ffn")):
        t += [((ours, "fn"), f"{theirs}_fn", ((2 + n) * n, n * d), ((2 + n) * n, n * d), False),
              ((ours, "base"), f"{theirs}_base", ((2 + n) * n,), ((2 + n) * n,), False),
              ((ours, "scale"), f"{theirs}_scale", (3,), (3,), False)]
    t += [
        (a + ("q_a_proj", "kernel"), "attn.wq_a.weight", (d, lq), (lq, d), True),
        (a + ("q_a_norm", "scale"), "attn.q_norm.weight", (lq,), (lq,), False),
        (a + ("q_b_proj", "kernel"), "attn.wq_b.weight", (lq, h, dh), (h * dh, lq), True),
        (a + ("kv_proj", "kernel"), "attn.wkv.weight", (d, dh), (dh, d), True),
        (a + ("kv_norm", "scale"), "attn.kv_norm.weight", (dh,), (dh,), False),
        (a + ("o_a_proj",), "attn.wo_a.weight", (per_group, g, r), (g * r, per_group), True),
        (a + ("o_b_proj", "kernel"), "attn.wo_b.weight", (g * r, d), (d, g * r), True),
        (a + ("sinks",), "attn.attn_sink", (h,), (h,), False),
    ]
    if layer_type != SWA:
        rate, overlap = c.compress_rate(layer_type), layer_type == CSA
        t += _v4_compressor("attn.compressor", a + ("compressor",), d, dh * (2 if overlap else 1), dh, rate)
    if layer_type == CSA:
        hi, di, ix = c.index_n_heads, c.index_head_dim, a + ("indexer",)
        t += [(ix + ("q_b_proj", "kernel"), "attn.indexer.wq_b.weight", (lq, hi, di), (hi * di, lq), True),
              (ix + ("weights_proj",), "attn.indexer.weights_proj.weight", (d, hi), (hi, d), True)]
        t += _v4_compressor("attn.indexer.compressor", ix + ("compressor",), d, 2 * di, di, c.compress_rate(CSA))
    e, i, s = c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts * c.moe_intermediate_size
    m = ("mlp",)
    t.append((m + ("gate", "kernel"), "ffn.gate.weight", (d, e), (e, d), True))
    if hashed:
        k = c.num_experts_per_tok
        t.append((m + ("gate", "tid2eid"), "ffn.gate.tid2eid", (c.vocab_size, k), (c.vocab_size, k), False))
    else:
        t.append((m + ("gate", "e_score_correction_bias"), "ffn.gate.bias", (e,), (e,), False))
    t += [(m + ("experts", "gate_proj"), "ffn.experts.{e}.w1.weight", (d, i), (i, d), True),
          (m + ("experts", "up_proj"), "ffn.experts.{e}.w3.weight", (d, i), (i, d), True),
          (m + ("experts", "down_proj"), "ffn.experts.{e}.w2.weight", (i, d), (d, i), True)]
    if s:
        t += [(m + ("shared_experts", "gate_proj", "kernel"), "ffn.shared_experts.w1.weight", (d, s), (s, d), True),
              (m + ("shared_experts", "up_proj", "kernel"), "ffn.shared_experts.w3.weight", (d, s), (s, d), True),
              (m + ("shared_experts", "down_proj", "kernel"), "ffn.shared_experts.w2.weight", (s, d), (d, s), True)]
    return t


def _v4_maps(c: ModelConfig) -> list[TensorMap]:
    d, v, n = c.hidden_size, c.vocab_size, c.hc_mult
    maps = [
        TensorMap(("embed_tokens", "embedding"), (v, d), (("embed.weight", ()),), (v, d)),
        TensorMap(("norm", "scale"), (d,), (("norm.weight", ()),), (d,)),
        TensorMap(("lm_head", "kernel"), (d, v), (("head.weight", ()),), (v, d), transpose=True),
        TensorMap(("hc_head", "hc_fn"), (n, n * d), (("hc_head_fn", ()),), (n, n * d)),
        TensorMap(("hc_head", "hc_base"), (n,), (("hc_head_base", ()),), (n,)),
        TensorMap(("hc_head", "hc_scale"), (1,), (("hc_head_scale", ()),), (1,)),
    ]
    for name, start, length in c.layer_runs:
        layer_type, hashed = run_kinds(name)
        for path, suffix, shape, hf_shape, transpose in _v4_layer_templates(c, layer_type, hashed):
            per_expert = "{e}" in suffix
            lead = (length,) + ((c.n_routed_experts,) if per_expert else ())
            sources = []
            for j, layer in enumerate(range(start, start + length)):
                key = f"layers.{layer}.{suffix}"
                sources += ([(key.format(e=e), (j, e)) for e in range(c.n_routed_experts)] if per_expert
                            else [(key, (j,))])
            maps.append(TensorMap((name,) + path, lead + shape, tuple(sources), hf_shape, transpose,
                                  keep_fp32=suffix.endswith(("gate.bias", "tid2eid")),
                                  integer=suffix.endswith("tid2eid")))
    return maps
