"""HF checkpoint layout <-> our params pytree (docs/reference.md, section 4).

``hf_tensor_map(config)`` is the one description of the mapping: for every leaf of our (scanned) params tree,
which HF tensors fill it, at which index of the stacked layer / expert dims, and how each is laid out
(``[out, in]`` PyTorch linears are transposed to ``[in, out]`` and split into heads). ``load_pretrained``,
the streaming converter and export all walk it, one source tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deepseek_jax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One leaf of our params tree and the HF tensors that fill it.

    path: the leaf's path in the params tree.
    shape: the leaf's full shape, stacked dims (layers, experts) first.
    sources: ``(hf_key, index)`` pairs; ``index`` addresses the stacked leading dims (``()`` when none).
    hf_shape: the shape every source has in the checkpoint.
    transpose: True for linear weights stored ``[out, in]``.
    keep_fp32: stored and kept in fp32 whatever the requested dtype (the router's correction bias).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    hf_shape: tuple[int, ...]
    transpose: bool = False
    keep_fp32: bool = False

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
