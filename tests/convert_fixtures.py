"""Checkpoints the converter tests read: transformers ``save_pretrained`` output (fp32, bf16, with the MTP
layer), a PyTorch state dict, and a hand-made FP8 release-layout checkpoint. Built independently of
``deepseek_jax.checkpoint.convert`` (own FP8 quantizer, ``safetensors`` library for writing)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from hf_reference import hf_model, hf_mtp_model, save_with_mtp, torch_logits
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_jax import ModelConfig

TOKENS = np.random.RandomState(0).randint(0, 300, (2, 12)).astype(np.int32)

# Dimensions that are not multiples of 128, so FP8 blocks are partial at the edges.
FP8_CONFIG = ModelConfig(
    vocab_size=300, hidden_size=192, intermediate_size=272, moe_intermediate_size=144, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=160, kv_lora_rank=136, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=1024, rope_scaling=None,
)


def read_all(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (index or single file), by key."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def make_hf(path: str, config: ModelConfig, mtp: bool, dtype=torch.float32, seed: int = 0):
    """``save_pretrained`` of a random model (plus the MTP layer); returns the model in fp32 for reference."""
    model = hf_model(config, seed=seed, bias_scale=0.05 if config.model_type == "deepseek_v3" else 0.0)
    if mtp:
        save_with_mtp(model, hf_mtp_model(model), path)
    else:
        model.save_pretrained(path, max_shard_size="200KB")
    if dtype != torch.float32:
        # Rewrite every tensor in ``dtype`` (the router's correction bias stays fp32, as in the releases).
        tensors = read_all(path)
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            wm = json.load(f)["weight_map"]
        for name in sorted(set(wm.values())):
            part = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)).contiguous()
                    for k, v in tensors.items() if wm[k] == name}
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
    return model


def block_quantize(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The release format, written here from docs/reference.md: per 128x128 block scale = amax / 448."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / 128), math.ceil(cols / 128)
    scale = torch.empty(br, bc)
    w8 = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s = max(blk.abs().max().item(), 1e-12) / 448.0
            if ue8m0:
                s = 2.0 ** math.ceil(math.log2(s))
            scale[i, j] = s
            w8[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w8, scale


def block_dequantize(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = w8.shape
    s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return w8.float() * s


def fp8_quantized(key: str) -> bool:
    """Which tensors the V3 release stores in FP8: layer linears, except the router and ``eh_proj``."""
    return ".layers." in key and "_proj" in key and key.endswith(".weight") and "eh_proj" not in key


def v32_fp8_quantized(key: str) -> bool:
    """V3.2's release adds the indexer: ``wq_b`` and ``wk`` in FP8, ``weights_proj`` in bf16 (DeepSeek's
    inference code builds it in fp32 from the checkpoint's bf16)."""
    if ".indexer." in key:
        return key.endswith((".wq_b.weight", ".wk.weight"))
    return fp8_quantized(key)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the non-negative e2m1 values by code


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's expert format, written here from transformers' FineGrainedFP8 reader: per row and 32 inputs a
    power-of-two scale >= amax / 6 (e8m0), values to the nearest e2m1 code (sign in bit 3), two codes per int8
    byte with the even input in the low nibble."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // 32, 32)
    scale = torch.exp2(torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)))
    v = g / scale[..., None]
    code = (v.abs()[..., None] - E2M1).abs().argmin(-1) + 8 * (v < 0)
    code = code.reshape(rows, cols).to(torch.uint8)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def v4_release_quantized(name: str) -> str | None:
    """How the V4 release stores a tensor (DeepSeek's names): "fp4" the routed experts, "fp8" the attention's
    and shared expert's linears (the compressors' and indexer's projections, the router, norms, embeddings and
    head stay in full precision), None otherwise."""
    if not name.endswith(".weight") or ".compressor." in name or "weights_proj" in name:
        return None
    if ".ffn.experts." in name:
        return "fp4"
    if any(f".{p}." in name for p in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")) or ".shared_experts." in name:
        return "fp8"
    return None


def make_v4_release(path: str, model) -> None:
    """A transformers V4 model saved as DeepSeek's V4 release stores it: release names, FP4 experts and FP8
    (ue8m0 128x128) linears with their scales under ``<name>.scale``, and the FineGrainedFP8 quantization_config
    that transformers reads it with."""
    from deepseek_jax.checkpoint.hf_map import canonical_v4_keys

    model.save_pretrained(path)
    sd = read_all(path)
    out = {}
    for name, key in canonical_v4_keys(list(sd)).items():
        kind, t = v4_release_quantized(name), sd[key]
        if kind is None:
            out[name] = t
            continue
        q, scale = fp4_quantize(t) if kind == "fp4" else block_quantize(t, ue8m0=True)
        out[name], out[name[: -len("weight")] + "scale"] = q, scale.to(torch.float8_e8m0fnu)
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(path, name))
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0", "expert_dtype": "fp4"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def make_fp8(path: str, ue8m0: bool = False, n_files: int = 3, config: ModelConfig = FP8_CONFIG,
             quantized=fp8_quantized, mtp: bool = True):
    """A V3-layout FP8 checkpoint (with MTP layer unless not ``mtp``) sharded over ``n_files``, the keys
    ``quantized`` picks in FP8; returns (transformers model holding the dequantized weights, {key: original
    tensor})."""
    src = path + "-fp32"
    make_hf(src, config, mtp=mtp)
    tensors = read_all(src)
    out, dequant = {}, {}
    for k, v in tensors.items():
        if quantized(k):
            w8, s = block_quantize(v, ue8m0)
            out[k], out[k + "_scale_inv"] = w8, s
            dequant[k] = block_dequantize(w8, s)
        else:
            out[k] = v.to(torch.bfloat16) if "norm" not in k and "correction" not in k else v
            dequant[k] = out[k].float()
    os.makedirs(path)
    keys = sorted(out)
    weight_map = {}
    for i in range(n_files):
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {k: out[k].contiguous() for k in keys[i::n_files]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    if ue8m0:
        cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    # The reference: transformers on the dequantized weights (main model; MTP keys are not part of it).
    ref = hf_model(config)
    sd = {k: v for k, v in dequant.items() if not k.startswith(f"model.layers.{config.num_hidden_layers}.")}
    _load_per_expert(ref, sd)
    return ref, out


def _load_per_expert(model, sd: dict[str, torch.Tensor]) -> None:
    """Load per-expert checkpoint keys into transformers 5's fused expert parameters."""
    fused: dict[str, dict] = {}
    plain = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            prefix, rest = k.split(".mlp.experts.")
            e, proj = rest.split(".")[0], rest.split(".")[1]
            fused.setdefault(prefix, {})[(int(e), proj)] = v
        else:
            plain[k] = v
    with torch.no_grad():
        state = model.state_dict()
        for prefix, parts in fused.items():
            n = 1 + max(e for e, _ in parts)
            state[prefix + ".mlp.experts.gate_up_proj"].copy_(torch.stack(
                [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], 0) for e in range(n)]))
            state[prefix + ".mlp.experts.down_proj"].copy_(torch.stack([parts[(e, "down_proj")] for e in range(n)]))
        for k, v in plain.items():
            state[k].copy_(v)
        missing = set(state) - set(plain) - {p + s for p in fused for s in (".mlp.experts.gate_up_proj",
                                                                             ".mlp.experts.down_proj")}
        assert not missing, missing


__all__ = ["FP8_CONFIG", "TOKENS", "make_fp8", "make_hf", "read_all", "torch_logits"]
