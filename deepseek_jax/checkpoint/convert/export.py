"""``deepseek-jax export SRC DST``: a converted (Orbax) directory, or a ``deepseek-jax train`` work directory (its
latest checkpoint: a fine-tuned model) -> HF safetensors shards + index + config.json,
the layout transformers' ``from_pretrained`` and DeepSeek's releases use; ``--fp8`` re-quantizes to the
release's e4m3fn + 128x128 ``weight_scale_inv`` format (V4: its routed experts to FP4, as V4's release stores them:
``quant/fp4.py``, e8m0 scales).

Streams like ``convert``: every HF tensor is read from its slot of the Orbax leaf (tensorstore reads only that
chunk), turned back with ``TensorMap.to_hf`` and appended to the current shard, whose header was written
first; peak memory is one tensor.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import struct
import time
from typing import Callable, Optional

import jax
import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint import orbax_io
from deepseek_jax.checkpoint.convert.convert import (
    EXTRA_FILES_DIR,
    AtomicDir,
    progress_bar,
)
from deepseek_jax.checkpoint.hf_dir import INDEX_FILE, SINGLE_FILE
from deepseek_jax.checkpoint.hf_map import hf_tensor_map
from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.checkpoint.orbax_io import PARAMS_DIR, SCALE_SUFFIX
from deepseek_jax.checkpoint.safetensors_io import DTYPE_NAMES, CheckpointError
from deepseek_jax.checkpoint.train_dir import (
    CHECKPOINTS_DIR,
    STATE_ITEM,
    is_train_workdir,
    lora_scale,
)
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.quant import fp4
from deepseek_jax.quant.blocks import (
    BLOCK,
    E4M3,
    block_grid,
    dequantize_region,
    quantize_tiles,
)

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
          "float16": np.dtype(np.float16)}
FP8 = np.dtype(E4M3)
# Linear weights DeepSeek's FP8 releases keep in higher precision (docs/reference.md, section 4).
_NOT_QUANTIZED = {("lm_head", "kernel"), ("mlp", "gate", "kernel"), ("eh_proj", "kernel"),
                  ("indexer", "weights_proj"),  # V3.2: bf16 in the release (wq_b and wk are e4m3)
                  ("compressor", "kv_proj", "kernel"), ("compressor", "gate_proj", "kernel")}  # V4's compressors


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", s.upper())
    if not m:
        raise ValueError(f"--max-shard-size {s!r}: expected a size such as 5GB or 500MB")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def release_quantized(path: tuple[str, ...], transpose: bool) -> bool:
    """Whether the FP8 release stores this leaf's tensors as e4m3fn with block scales."""
    return transpose and not any(path[-len(p):] == p for p in _NOT_QUANTIZED)


@dataclasses.dataclass
class OutTensor:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SafetensorsWriter:
    """Writes one ``.safetensors`` file from a known list of tensors: header first, then data in order."""

    def __init__(self, path: str, tensors: list[OutTensor], metadata: Optional[dict] = None):
        self.path, self.tensors = path, tensors
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for t in tensors:
            header[t.key] = {"dtype": DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
        self._header = raw

    def write(self, on_tensor: Optional[Callable[[int], None]] = None) -> None:
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(self._header)))
            f.write(self._header)
            for t in self.tensors:
                arr = np.ascontiguousarray(t.produce())
                if tuple(arr.shape) != tuple(t.shape) or arr.dtype != t.dtype:
                    raise AssertionError(f"{t.key}: produced {arr.dtype}{list(arr.shape)}, "
                                         f"declared {t.dtype}{list(t.shape)}")
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                if on_tensor is not None:
                    on_tensor(t.nbytes)
                del arr


def write_sharded(out_dir: str, tensors: list[OutTensor], max_shard_bytes: int, progress=None) -> dict:
    """Shards (``model-0000i-of-0000N.safetensors``, or one ``model.safetensors``) + index; returns the index."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, group in zip(names, shards):
        SafetensorsWriter(os.path.join(out_dir, name), group, {"format": "pt"}).write(
            None if progress is None else progress.update)
        weight_map.update({t.key: name for t in group})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    if n > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return index


def _layer_of(key: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


TRAIN_FILES = ("tokenizer.json", "tokenizer_config.json")  # what export copies from a train work directory


def _train_params_dir(src: str, step: Optional[int] = None) -> tuple[str, int]:
    """A train work directory's checkpoint of ``step`` (default: the latest finished one) and the step."""
    ckpts = os.path.join(src, CHECKPOINTS_DIR)
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()
                   and os.path.isdir(os.path.join(ckpts, d, STATE_ITEM)))
    if not steps:
        raise CheckpointError(f"{ckpts}: no finished checkpoint to export")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{ckpts}: no checkpoint of step {step} (have {steps})")
    return os.path.abspath(os.path.join(ckpts, str(step), STATE_ITEM)), step


class _InMemory:
    """An array as ``plan_export`` reads a lazily stored tensor (``shape``, ``dtype.numpy_dtype``, indexing,
    ``read().result()``)."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape, self.dtype = self.array.shape, type("dtype", (), {"numpy_dtype": self.array.dtype})()

    def __getitem__(self, index):
        return _InMemory(self.array[index])

    def read(self):
        done = concurrent.futures.Future()
        done.set_result(self.array)
        return done


def plan_export(src: str, fp8: bool = False, dtype: Optional[str] = None, ue8m0: Optional[bool] = None):
    """``(config, marker, [OutTensor])`` in HF order (embedding, layer by layer, norm, head)."""
    config = ModelConfig.from_pretrained(src)
    if is_train_workdir(src):  # params as trained (fp32 master weights unless --dtype), read lazily
        state_dir, _ = _train_params_dir(src)
        marker = {}
        stores = orbax_io.open_lazy(state_dir)["params"]
        if lora_scale(src) is not None:  # a LoRA run's checkpoints hold the adapters only: the merged model,
            # read through the base they point at (whole, in host memory; `--adapter` writes the adapters alone)
            stores = jax.tree.map(_InMemory, load_pretrained(src)[1])
    else:
        marker = orbax_io.read_marker(src)
        stores = orbax_io.open_lazy(os.path.abspath(os.path.join(src, PARAMS_DIR)))
    if ue8m0 is None:
        ue8m0 = marker.get("scale_fmt") == "ue8m0" or (fp8 and config.is_v4)  # V4's release scales are e8m0
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")

    def store(path):
        node = stores
        for k in path:
            if not isinstance(node, dict) or k not in node:
                raise CheckpointError(f"{os.path.join(src, PARAMS_DIR)}: leaf '{'/'.join(path)}' missing from the "
                                      f"Orbax checkpoint")
            node = node[k]
        return node

    def read(t, index):
        return np.asarray(t[index].read().result() if index else t.read().result())

    out: list[OutTensor] = []
    cache: dict = {}
    for tm in hf_tensor_map(config):
        t = store(tm.path)
        if tuple(t.shape) != tuple(tm.shape):
            raise CheckpointError(f"{os.path.join(src, PARAMS_DIR)}: leaf '{'/'.join(tm.path)}' has shape "
                                  f"{list(t.shape)}, expected {list(tm.shape)} from config.json")
        stored = np.dtype(t.dtype.numpy_dtype)
        kept_fp8 = stored == FP8
        scale_t = store(tm.path[:-1] + (tm.path[-1] + SCALE_SUFFIX,)) if kept_fp8 else None
        quantize = fp8 and release_quantized(tm.path, tm.transpose)
        src_dtype = marker.get("source_dtypes", {}).get("/".join(tm.path))
        if tm.integer:  # V4's token -> expert table, int64 as transformers keeps it
            plain = np.dtype(np.int64)
        elif tm.keep_fp32:
            plain = np.dtype(np.float32)
        elif dtype is not None:
            plain = DTYPES[dtype]
        elif src_dtype in DTYPES:  # as the source had it (bit-exact round trip when converted losslessly)
            plain = DTYPES[src_dtype]
        else:  # FP8 sources written without --fp8
            plain = np.dtype(ml_dtypes.bfloat16) if src_dtype is not None or kept_fp8 else stored
        for key, index in tm.sources:
            if quantize and config.is_v4 and tm.path[-2] == "experts":  # FP4, as V4's release stores them
                def fp4_pair(tm=tm, t=t, s=scale_t, index=index, key=key):
                    if cache.get("key") != key:
                        w = tm.to_hf(read(t, index))
                        if s is not None:
                            w = dequantize_region(w, read(s, index).T)
                        cache.update(key=key, pair=fp4.quantize(w))
                    return cache["pair"]

                out.append(OutTensor(key, (tm.hf_shape[0], tm.hf_shape[1] // 2), np.dtype(np.int8),
                                     lambda q=fp4_pair: np.ascontiguousarray(q()[0])))
                out.append(OutTensor(key + "_scale_inv", fp4.scale_shape(tm.hf_shape),
                                     np.dtype(ml_dtypes.float8_e8m0fnu),
                                     lambda q=fp4_pair: np.ascontiguousarray(q()[1])))
            elif quantize:
                def quantized(tm=tm, t=t, s=scale_t, index=index, key=key):
                    # The weight and its scale are written one after the other: quantize once for both.
                    if cache.get("key") != key:
                        if s is not None:  # kept FP8: the stored bytes, back in HF layout
                            pair = (tm.to_hf(read(t, index)), read(s, index).T)
                        else:
                            pair = quantize_tiles(tm.to_hf(read(t, index).astype(np.float32)), (BLOCK, BLOCK),
                                                  power_of_two=ue8m0)
                        cache.update(key=key, pair=pair)
                    return cache["pair"]

                def w(q=quantized):
                    return np.ascontiguousarray(q()[0])

                def sc(q=quantized):
                    return np.ascontiguousarray(q()[1], np.float32)

                rows, cols = tm.hf_shape
                out.append(OutTensor(key, tuple(tm.hf_shape), FP8, w))
                out.append(OutTensor(key + "_scale_inv", block_grid((rows, cols)), np.dtype(np.float32), sc))
            else:
                def p(tm=tm, t=t, s=scale_t, index=index, dt=plain):
                    if s is not None:
                        w8 = tm.to_hf(read(t, index))
                        return dequantize_region(w8, read(s, index).T).astype(dt)
                    return np.ascontiguousarray(tm.to_hf(read(t, index))).astype(dt, copy=False)

                out.append(OutTensor(key, tuple(tm.hf_shape), plain, p))
    # The MTP layers' own copies of the embedding and head, when the source had them.
    copies = marker.get("mtp_copies", {})
    by_key = {o.key: o for o in out}
    for k in range(config.num_nextn_predict_layers):
        base = f"model.layers.{config.num_hidden_layers + k}."
        for name, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                           ("shared_head.head.weight", "lm_head.weight")):
            if copies.get(name):
                m = by_key[main]
                out.append(OutTensor(base + name, m.shape, m.dtype, m.produce))
    order = {o.key: i for i, o in enumerate(out)}
    out.sort(key=lambda o: (_layer_of(o.key) if _layer_of(o.key) >= 0 else (-1 if "embed" in o.key else 10**9),
                            order[o.key]))
    return config, marker, out


def _export_config(src: str, fp8: bool, ue8m0: bool, v4: bool = False) -> dict:
    with open(os.path.join(src, "config.json")) as f:
        d = json.load(f)
    d.pop("quantization_config", None)
    if fp8:
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128]}
        if ue8m0:
            d["quantization_config"]["scale_fmt"] = "ue8m0"
        if v4:
            d["quantization_config"]["expert_dtype"] = "fp4"
    return d


def export(src: str, dst: str, fp8: bool = False, dtype: Optional[str] = None, max_shard_size: str = "5GB",
           ue8m0: Optional[bool] = None, progress: bool = True, force: bool = False) -> dict:
    src = os.fspath(src)
    train = is_train_workdir(src)
    if not orbax_io.is_converted_dir(src) and not train:
        raise CheckpointError(f"{src}: neither a converted directory (no {orbax_io.MARKER_FILE}; run "
                              f"`deepseek-jax convert` first) nor a train work directory")
    max_bytes = parse_size(max_shard_size)
    config, marker, tensors = plan_export(src, fp8=fp8, dtype=dtype, ue8m0=ue8m0)
    if ue8m0 is None:
        ue8m0 = marker.get("scale_fmt") == "ue8m0" or (fp8 and config.is_v4)
    total = sum(t.nbytes for t in tensors)
    t0 = time.perf_counter()
    with AtomicDir(dst, force) as tmp:
        bar = progress_bar(total, "export", progress)
        try:
            write_sharded(tmp, tensors, max_bytes, bar)
        finally:
            if bar is not None:
                bar.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_export_config(src, fp8, ue8m0, config.is_v4), f, indent=2)
        if train:
            for name in TRAIN_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        extras = os.path.join(src, EXTRA_FILES_DIR)
        if os.path.isdir(extras):
            for name in sorted(os.listdir(extras)):
                shutil.copy2(os.path.join(extras, name), os.path.join(tmp, name))
    return {"bytes": total, "seconds": time.perf_counter() - t0, "tensors": len(tensors), "config": config}
