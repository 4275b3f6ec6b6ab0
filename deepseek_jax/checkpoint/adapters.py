"""LoRA adapters in PEFT's format: a LoRA work directory's adapters -> ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(transformers_model, DIR)`` loads, and back.

What PEFT (0.21, on transformers 5) can express, and how our adapters map onto it:

- A linear layer ``model.layers.{i}.self_attn.q_b_proj`` (``target_modules``): ``lora_A.weight [r, in]`` and
  ``lora_B.weight [out, r]``, our ``lora_a [*in, r]`` / ``lora_b [r, *out]`` flattened to HF's in / out order
  (the transposed layout of ``checkpoint/hf_map.py``'s ``TensorMap``) and transposed.
- The routed experts (``target_parameters``): transformers fuses them into ``experts.gate_up_proj [E, 2I, D]`` and
  ``experts.down_proj [E, D, I]``, and PEFT puts one adapter on each fused parameter: ``lora_A [r E, in]`` (rows
  expert-major), ``lora_B [out, r E]`` (columns rank-major). Our separate gate and up adapters of rank R become one
  exact adapter of rank 2R on ``gate_up_proj`` (A stacked, B block-diagonal; ``rank_pattern`` / ``alpha_pattern``
  keep alpha / r); PEFT nests the two wrappers, ``gate_up_proj``'s under ``experts.base_layer``.
- Not expressible: peft redirects a ``target_modules`` entry ending in ``gate_proj`` / ``up_proj`` /
  ``down_proj`` to the fused routed experts, so adapters on a dense MLP or the shared experts have no PEFT form
  (``AdapterError`` says so and points to the merged export), nor do V4's layers (not mapped yet).
"""

from __future__ import annotations

import json
import os

import numpy as np

from deepseek_jax.checkpoint.hf_map import hf_tensor_map, split_point
from deepseek_jax.checkpoint.safetensors_io import CheckpointError
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.layers.lora import adapter_prefix

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    """Adapters that PEFT's format cannot hold, or a PEFT adapter directory we cannot read."""


def _adapted(params: dict, path: tuple) -> tuple:
    """``(lora_a, lora_b)`` of the kernel at ``path`` in ``params``, or None."""
    node = params
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            return None
    prefix = adapter_prefix(path[-1])
    if not isinstance(node, dict) or f"{prefix}lora_a" not in node:
        return None
    return np.asarray(node[f"{prefix}lora_a"], np.float32), np.asarray(node[f"{prefix}lora_b"], np.float32)


def peft_tensors(config: ModelConfig, params: dict, rank: int, alpha: float) -> tuple[dict, dict]:
    """``(tensors, adapter_config)`` in PEFT's format for ``params``' adapters (see the module docstring)."""
    if config.is_v4:
        raise AdapterError("a PEFT adapter for DeepSeek-V4 is not mapped yet; export the merged weights "
                           "(`deepseek-jax export WORKDIR OUT` without --adapter)")
    tensors, modules, experts = {}, [], {}
    for tm in hf_tensor_map(config):
        pair = _adapted(params, tm.path)
        if pair is None or tm.path[0].startswith("mtp_"):  # transformers' models have no MTP layer
            continue
        a, b = pair
        mlp = tm.path[-3:-1] == ("mlp", "experts") if len(tm.path) >= 3 else False
        if "mlp" in tm.path and not mlp:
            raise AdapterError(f"LoRA on {'/'.join(tm.path[:-1])}: peft (0.21) sends any target ending in "
                               "gate_proj / up_proj / down_proj to the fused routed experts, so adapters on a dense "
                               "MLP or the shared experts have no PEFT form; export the merged weights "
                               "(`deepseek-jax export WORKDIR OUT` without --adapter)")
        for key, index in tm.sources:
            ai, bi = a[index], b[index]  # [*in, r], [r, *out] of this layer (and expert)
            r = ai.shape[-1]
            a2, b2 = ai.reshape(-1, r), bi.reshape(r, -1)
            if not mlp:
                module = key[:-len(".weight")]
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a2.T)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b2.T)
                modules.append(module)
                continue
            layer, expert = key.split(".mlp.experts.")
            e, proj = int(expert.split(".")[0]), expert.split(".")[1]
            experts.setdefault(layer, {}).setdefault(proj, {})[e] = (a2, b2)
    targets = []
    for layer, projs in experts.items():
        n = config.n_routed_experts
        i, d = config.moe_intermediate_size, config.hidden_size
        base = f"{layer}.mlp.experts"
        if "gate_proj" in projs or "up_proj" in projs:  # rank 2R on the fused [2I, D]: A = [A_g; A_u], B block-diag
            a_all = np.zeros((n, 2 * rank, d), np.float32)
            b_all = np.zeros((2 * i, 2 * rank, n), np.float32)
            for half, proj in enumerate(("gate_proj", "up_proj")):
                for ex, (a2, b2) in projs.get(proj, {}).items():
                    a_all[ex, half * rank:(half + 1) * rank] = a2.T
                    b_all[half * i:(half + 1) * i, half * rank:(half + 1) * rank, ex] = b2.T
            nested = ".base_layer" if "down_proj" in projs else ""
            tensors[f"{PREFIX}{base}{nested}.lora_A.weight"] = a_all.reshape(n * 2 * rank, d)
            tensors[f"{PREFIX}{base}{nested}.lora_B.weight"] = b_all.reshape(2 * i, 2 * rank * n)
            targets.append(f"{base}.gate_up_proj")
        if "down_proj" in projs:  # [E, D, I]: in I, out D
            a_all = np.zeros((n, rank, i), np.float32)
            b_all = np.zeros((d, rank, n), np.float32)
            for ex, (a2, b2) in projs["down_proj"].items():
                a_all[ex], b_all[:, :, ex] = a2.T, b2.T
            tensors[f"{PREFIX}{base}.lora_A.weight"] = a_all.reshape(n * rank, i)
            tensors[f"{PREFIX}{base}.lora_B.weight"] = b_all.reshape(d, rank * n)
            targets.append(f"{base}.down_proj")
    if not tensors:
        raise AdapterError("no adapters to export")
    fused = any(t.endswith("gate_up_proj") for t in targets)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "target_modules": sorted(modules) or None, "target_parameters": targets or None,
        "rank_pattern": {"gate_up_proj": 2 * rank} if fused else {},
        "alpha_pattern": {"gate_up_proj": 2 * alpha} if fused else {},
    }
    return tensors, adapter_config


def write_adapter(out: str, tensors: dict, adapter_config: dict, base: str = None, force: bool = False) -> None:
    """``out/adapter_config.json`` + ``out/adapter_model.safetensors``, written to a temp dir then renamed."""
    from safetensors.numpy import save_file

    from deepseek_jax.checkpoint.convert.convert import AtomicDir

    with AtomicDir(out, force) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump({**adapter_config, "base_model_name_or_path": base}, f, indent=2)


def export_adapter(workdir: str, out: str, force: bool = False) -> dict:
    """A LoRA work directory's latest adapters as a PEFT adapter directory ``out``; returns the counts."""
    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.checkpoint.train_dir import is_train_workdir, load_train_checkpoint

    if not is_train_workdir(workdir):
        raise AdapterError(f"{workdir}: not a train work directory (--adapter exports a LoRA run's adapters)")
    with open(os.path.join(workdir, "train_config.json")) as f:
        tc = json.load(f)
    if not tc.get("lora_rank"):
        raise AdapterError(f"{workdir}/train_config.json: lora_rank is 0, not a LoRA run; export it without "
                           "--adapter")
    config, params = load_train_checkpoint(workdir, merge_lora=False, load_base=load_pretrained)
    tensors, adapter_config = peft_tensors(config, params, tc["lora_rank"], tc["lora_alpha"])
    write_adapter(out, tensors, adapter_config, base=tc.get("lora_base"), force=force)
    return {"tensors": len(tensors), "values": int(sum(t.size for t in tensors.values()))}


def _pattern_value(patterns: dict, key: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern that ends ``key`` at a dot."""
    import re

    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_peft_adapter(directory: str, config: ModelConfig) -> tuple[dict, int, tuple[str, ...]]:
    """A PEFT LoRA adapter directory (peft's own, or ``export --adapter``'s) for a transformers model of
    ``config`` -> ``(adapters, rank, targets)``: ``adapters`` maps each of our adapter leaves' '/'-joined paths to
    ``(values, provided)``, the leaf's full stacked shape and a bool per (layer[, expert]) entry the file holds;
    ``rank``: the largest rank in the file (smaller ones are padded with zeros); ``targets``: our ``LoraOptions``
    globs for the adapted layers. Each module's scale ``alpha / r`` is folded into its B, so the run uses
    ``alpha = rank`` (scale 1) and computes exactly peft's output."""
    from safetensors.numpy import load_file

    cfg_path, w_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(f"{p}: missing (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    with open(cfg_path) as f:
        pc = json.load(f)
    for field, ok in (("peft_type", lambda v: v == "LORA"), ("use_dora", lambda v: not v),
                      ("use_rslora", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                      ("fan_in_fan_out", lambda v: not v)):
        if field in pc and not ok(pc[field]):
            raise AdapterError(f"{cfg_path}: {field} = {pc[field]!r} is not supported (plain LoRA only)")
    weights = load_file(w_path)
    by_module = {}
    for key, value in weights.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                by_module.setdefault(name[:-len(part)], {})[part[6]] = value.astype(np.float32)
                break
        else:
            raise AdapterError(f"{w_path}: tensor {key!r} is not a LoRA A / B weight")
    maps = {}
    for tm in hf_tensor_map(config):
        for key, index in tm.sources:
            maps[key[:-len(".weight")]] = (tm, index)
    r0, a0 = pc.get("r", 8), pc.get("lora_alpha", 8)
    ranks_patterns, alpha_patterns = pc.get("rank_pattern") or {}, pc.get("alpha_pattern") or {}
    targets = set(pc.get("target_parameters") or ())
    pieces = []  # (our leaf path, stacked index, [*in, r] or [r, *out] values, rank)

    def targeted(name: str) -> bool:  # peft matches target_parameters by suffix
        return any(name == t or name.endswith("." + t) for t in targets)

    def add(tm, index, a2, b2, scale):
        """One adapted kernel slot: ``a2 [in, r]``, ``b2 [r, out]`` (HF's flattened in / out order)."""
        ins, outs, stem = _dims_and_stem(tm)
        r = a2.shape[1]
        pieces.append((stem + "lora_a", index, a2.reshape(ins + (r,)), r))
        pieces.append((stem + "lora_b", index, (scale * b2).reshape((r,) + outs), r))

    for module, ab in sorted(by_module.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{w_path}: {module} has lora_{'A' if 'A' in ab else 'B'} only")
        a, b = ab["A"], ab["B"]
        if ".mlp.experts" in module:
            layer = module.split(".mlp.experts")[0]
            base = f"{layer}.mlp.experts"
            d, i, n = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
            up, down = targeted(f"{base}.gate_up_proj"), targeted(f"{base}.down_proj")
            # By shape (gate_up reads D, down reads I); when D == I, peft's nesting: gate_up's under base_layer.
            fused = up and (a.shape[1] == d != i or (d == i and (module.endswith(".base_layer") or not down)))
            param = "gate_up_proj" if fused else "down_proj"
            want_in, want_out = (d, 2 * i) if fused else (i, d)
            if (not fused and not down) or a.shape[0] % n or a.shape[1] != want_in or b.shape != (
                    want_out, a.shape[0]):
                raise AdapterError(f"{w_path}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit "
                                   f"neither experts.gate_up_proj nor experts.down_proj of {n} experts (D {d}, "
                                   f"I {i}) among the target_parameters {sorted(targets)}")
            r = a.shape[0] // n
            scale = _pattern_value(alpha_patterns, f"{base}.{param}", a0) / r
            a_e = a.reshape(n, r, -1)  # [E, r, in]
            b_e = b.reshape(b.shape[0], r, n)  # [out, r, E]
            for e in range(n):
                if fused:  # [2I, D]: the first I rows are the gate's
                    for half, proj in enumerate(("gate_proj", "up_proj")):
                        tm, index = maps[f"{base}.{e}.{proj}"]
                        add(tm, index, a_e[e].T, b_e[half * i:(half + 1) * i, :, e].T, scale)
                else:
                    tm, index = maps[f"{base}.{e}.down_proj"]
                    add(tm, index, a_e[e].T, b_e[:, :, e].T, scale)
            continue
        if module not in maps:
            raise AdapterError(f"{w_path}: {module} is no linear layer of this {config.model_type} model")
        tm, index = maps[module]
        if "mlp" in tm.path:
            raise AdapterError(f"{w_path}: {module}: adapters on a dense MLP or shared experts are not read (peft "
                               "itself sends those names to the routed experts)")
        r = _pattern_value(ranks_patterns, module, r0)
        if a.shape[0] != r:
            raise AdapterError(f"{w_path}: {module}.lora_A.weight has {a.shape[0]} rows, expected r = {r} from "
                               f"{CONFIG_FILE}")
        add(tm, index, a.T, b.T, _pattern_value(alpha_patterns, module, a0) / r)
    if not pieces:
        raise AdapterError(f"{w_path}: no LoRA weights")
    rank = max(p[3] for p in pieces)
    shapes = {}
    for tm in hf_tensor_map(config):
        if tm.transpose:
            ins, outs, stem = _dims_and_stem(tm)
            lead = tm.shape[:len(tm.sources[0][1])]
            shapes[stem + "lora_a"], shapes[stem + "lora_b"] = lead + ins + (rank,), lead + (rank,) + outs
    adapters = {}
    for path, index, values, r in pieces:
        full, provided = adapters.setdefault(path, (np.zeros(shapes[path], np.float32),
                                                    np.zeros(shapes[path][:len(index)], bool)))
        if path.endswith("lora_a"):
            full[index + (Ellipsis, slice(0, r))] = values
        else:
            full[index + (slice(0, r),)] = values
        provided[index] = True
    targets_ours = sorted({p.rsplit("/lora_", 1)[0] if "/lora_" in p else p[:-len("_lora_a")]
                           for p in adapters if p.endswith("lora_a")})
    return adapters, rank, tuple(targets_ours)


def _dims_and_stem(tm) -> tuple[tuple, tuple, str]:
    """A transposed linear's ``TensorMap``: our kernel's input dims, its output dims, and the path prefix of its
    adapters (``moe_layers/self_attn/q_b_proj/`` + ``lora_a``; ``moe_layers/mlp/experts/gate_proj_`` + ``lora_a``)."""
    item, n_in = tm.item_shape, split_point(tm)
    stem = "/".join(tm.path[:-1]) + "/" + adapter_prefix(tm.path[-1])
    return tuple(item[:n_in]), tuple(item[n_in:]), stem
