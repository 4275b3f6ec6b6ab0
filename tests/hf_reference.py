"""Helpers that build the transformers reference models the tests compare against (float32, CPU)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

import deepseek_jax as dsj
from deepseek_jax import ModelConfig

_HF_CLASSES = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3", "deepseek_v32": "DeepseekV32"}


def hf_config(config: ModelConfig):
    """The transformers config object for one of our configs."""
    import transformers

    d = config.to_hf_dict()
    d.pop("rope_scaling")
    cls = getattr(transformers, _HF_CLASSES[config.model_type] + "Config")
    keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ or k in ("rope_parameters",)}
    hf = cls(**keep)
    hf._attn_implementation = "eager"
    return hf


def hf_model(config: ModelConfig, seed: int = 0, bias_scale: float = 0.0, init_std: float | None = None):
    """A random transformers ``DeepseekV{2,3}ForCausalLM`` in fp32 eval mode.

    bias_scale: std of a random ``e_score_correction_bias`` (V3), big enough to change expert choices.
    init_std: re-draw all weights with this std (default: transformers' init).
    """
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, _HF_CLASSES[config.model_type] + "ForCausalLM")
    model = cls(hf_config(config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init_std is not None and "norm" not in name:
                p.normal_(0.0, init_std)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm scales so a transposed or misplaced norm shows
        if bias_scale:
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0.0, bias_scale)
    return model


def hf_mtp_model(main_model, seed: int = 1):
    """transformers' ``MtpModel`` for ``main_model`` with random weights (norm scales non-trivial)."""
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(seed)
    mtp = MtpModel(main_model, main_model.config.num_mtp_layers).float().eval()
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name.startswith(("embed_tokens", "shared_head")):
                continue  # shared with the main model
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, main_model.config.initializer_range)
        for name, buf in mtp.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    return mtp


def mtp_state_dict(main_model, mtp) -> dict[str, torch.Tensor]:
    """The MTP weights under their checkpoint names (``model.layers.{L + k}.*``), per-expert keys included."""
    n_layers = main_model.config.num_hidden_layers
    out = {}
    for k, layer in enumerate(mtp.layers):
        base = f"model.layers.{n_layers + k}."
        for name, t in layer.state_dict().items():
            if name.startswith("mtp_block."):
                inner = name[len("mtp_block."):]
                if inner == "mlp.experts.gate_up_proj":
                    i = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        out[f"{base}mlp.experts.{e}.gate_proj.weight"] = t[e, :i].clone()
                        out[f"{base}mlp.experts.{e}.up_proj.weight"] = t[e, i:].clone()
                elif inner == "mlp.experts.down_proj":
                    for e in range(t.shape[0]):
                        out[f"{base}mlp.experts.{e}.down_proj.weight"] = t[e].clone()
                else:
                    out[base + inner] = t.clone()
            elif name.startswith("post_norm."):
                out[base + "shared_head.norm.weight"] = t.clone()
            else:
                out[base + name] = t.clone()
        out[base + "embed_tokens.weight"] = main_model.model.embed_tokens.weight.detach().clone()
        out[base + "shared_head.head.weight"] = main_model.lm_head.weight.detach().clone()
    return out


def save_with_mtp(main_model, mtp, path: str) -> None:
    """``save_pretrained`` the main model, then add the MTP layer as one more shard in the index."""
    from safetensors.torch import save_file

    main_model.save_pretrained(path, max_shard_size="200KB")
    extra = mtp_state_dict(main_model, mtp)
    fname = "model-mtp.safetensors"
    save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(path, fname), metadata={"format": "pt"})
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    else:  # a single-file save: turn it into an indexed one
        single = "model.safetensors"
        from safetensors import safe_open
        with safe_open(os.path.join(path, single), "pt") as f:
            index = {"metadata": {}, "weight_map": {k: single for k in f.keys()}}
    index["weight_map"].update({k: fname for k in extra})
    with open(index_path, "w") as f:
        json.dump(index, f)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_v4(config: ModelConfig, seed: int = 0):
    """A random transformers V4 model in fp32 eval mode, every weight drawn (transformers' init leaves sinks,
    position biases, hyper-connection biases at 0 and the hash table at expert 0: branches that would not show)."""
    import transformers

    d = config.to_hf_dict()
    hf_cfg = transformers.DeepseekV4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("sinks", "position_bias", ".base", ".scale", "hc_base", "hc_scale")):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
            elif name.endswith("tid2eid"):
                e, k = config.n_routed_experts, config.num_experts_per_tok
                b.copy_(torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(b.shape[0])]))
    return model


def load_hf(model, path):
    """Save a transformers model and load it back with ``load_pretrained`` -> ``(config, params)``."""
    model.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dsj.load_pretrained(path)
