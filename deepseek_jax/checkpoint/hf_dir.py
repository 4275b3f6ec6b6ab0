"""An HF-format checkpoint directory (``config.json`` + safetensors, sharded with an index or one file) read
tensor by tensor, checked against the mapping of ``hf_map.py``; FP8 and FP4 weights dequantized on read."""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterator, Optional

import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint.hf_map import TensorMap, canonical_v4_keys, optional_hf_keys
from deepseek_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.quant import fp4
from deepseek_jax.quant.blocks import dequantize_region

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def open_indexed_files(index: str, opener) -> tuple[dict, dict[str, str]]:
    """Open every file an index (``{"weight_map": {tensor: file}}``) names, with ``opener(path)``; fail on a
    bad index, a named file that does not exist, or a tensor missing from the file the index names.
    Returns ``({file: opened}, weight_map)``."""
    directory, name = os.path.dirname(index), os.path.basename(index)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index ({e!r})") from None
    files = {}
    for fname in sorted(set(weight_map.values())):
        fpath = os.path.join(directory, fname)
        if not os.path.exists(fpath):
            names = [k for k, v in weight_map.items() if v == fname]
            raise CheckpointError(f"{index}: names file '{fname}' (for '{names[0]}' and {len(names) - 1} "
                                  f"more) which does not exist")
        files[fname] = opener(fpath)
    for key, fname in weight_map.items():
        if key not in files[fname]:
            raise CheckpointError(f"{os.path.join(directory, fname)}: tensor '{key}' is listed in {name} "
                                  f"but not in the file")
    return files, weight_map


class HFCheckpoint:
    """The tensors of an HF-format directory (sharded with an index, or one ``model.safetensors``).

    Quantized weights with a ``<name>_scale_inv`` sibling (V4's release: ``<name>.scale``) are dequantized on
    read: FP8 (e4m3, 128 x 128 blocks) and V4's FP4 experts (two e2m1 per ``int8``, one scale per row and 32
    inputs; ``quant/fp4.py``). The scales are not listed as tensors of their own; ``shape`` is a packed FP4
    weight's logical ``[out, in]``.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index):
            self._files, weight_map = open_indexed_files(index, SafetensorsFile)
            self._where = dict(weight_map)
        elif os.path.exists(single):
            self._files[SINGLE_FILE] = SafetensorsFile(single)
            self._where = {k: SINGLE_FILE for k in self._files[SINGLE_FILE].keys()}
        else:
            raise CheckpointError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE} found")
        self._index(self._where)

    def _index(self, where: dict[str, str]) -> None:
        """Index the tensors from ``{name in the file: file}``. The name each goes by here may differ from its
        name in the file (``_name``) only for V4, whose files name tensors either as DeepSeek's release does or
        as transformers' save_pretrained writes them."""
        self._name = canonical_v4_keys(list(where))
        self._where = {k: where[f] for k, f in self._name.items()}
        self._scales = {k[: -len("_scale_inv")]: k for k in self._where if k.endswith("_scale_inv")}
        self.keys = [k for k in self._where if not k.endswith("_scale_inv")]

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, self._where[key])

    def release(self) -> None:
        """Unmap the files, so pages read so far stop counting toward RSS; they map again on the next read
        (the streaming converter calls this after every tensor)."""
        for f in self._files.values():
            f.close()

    def is_fp4(self, key: str) -> bool:
        """A packed FP4 weight: an integer byte tensor with a scale beside it."""
        return key in self._scales and self.dtype(key) in fp4.PACKED_DTYPES

    def is_fp8(self, key: str) -> bool:
        """A weight with a scale beside it that is not FP4 (the converter checks that it is e4m3)."""
        return key in self._scales and not self.is_fp4(key)

    def raw(self, key: str) -> np.ndarray:
        """The stored array (memory-mapped), without dequantization."""
        return self._files[self._where[key]].get(self._name[key])

    def shape(self, key: str) -> tuple[int, ...]:
        shape = tuple(self._files[self._where[key]].shape(self._name[key]))
        return shape[:-1] + (2 * shape[-1],) if self.is_fp4(key) else shape

    def dtype(self, key: str) -> np.dtype:
        """The stored dtype (``int8`` for FP4)."""
        return np.dtype(self._files[self._where[key]].dtype(self._name[key]))

    def nbytes(self, key: str) -> int:
        n = self._files[self._where[key]].nbytes(self._name[key])
        if key in self._scales:
            n += self._files[self._where[self._scales[key]]].nbytes(self._name[self._scales[key]])
        return n

    def read(self, key: str, rows: Optional[tuple[int, int]] = None,
             cols: Optional[tuple[int, int]] = None) -> np.ndarray:
        """The tensor, or its rows ``[r0, r1)`` (and columns ``[c0, c1)``), as a float array: FP8 and FP4
        weights dequantized to fp32, other dtypes as stored."""
        raw = self.raw(key)
        if self.is_fp4(key):
            if raw.ndim != 2:
                raise CheckpointError(f"{self.file_of(key)}: tensor '{key}': an FP4 weight must be 2-D "
                                      f"[out, in / 2], found {list(raw.shape)}")
            try:
                return fp4.dequantize(raw, self.raw(self._scales[key]), rows, cols)
            except ValueError as e:
                raise CheckpointError(f"{self.file_of(key)}: tensor '{key}': {e}") from None
        x = raw
        if rows is not None:
            x = np.asarray(raw[rows[0]:rows[1]] if cols is None else raw[rows[0]:rows[1], cols[0]:cols[1]])
        if key in self._scales:
            try:
                return dequantize_region(x, self.raw(self._scales[key]),
                                         origin=(rows[0] if rows else 0, cols[0] if cols else 0),
                                         full_shape=tuple(raw.shape))
            except ValueError as e:
                raise CheckpointError(f"{self.file_of(key)}: tensor '{key}': {e}") from None
        return x


def target_dtype(tm: TensorMap, source_dtype: np.dtype, dtype: Optional[np.dtype]) -> np.dtype:
    if tm.keep_fp32:
        return np.dtype(np.float32)
    if dtype is not None:
        return np.dtype(dtype)
    if source_dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        return source_dtype
    return np.dtype(ml_dtypes.bfloat16)  # fp8 sources: dequantized to bf16 unless asked otherwise


def check_dtype(ckpt: HFCheckpoint, key: str, tm: TensorMap, dtype: np.dtype) -> None:
    """A source tensor's dtype is floating (FP8 included), packed FP4 bytes with their scale, or integer for an
    integer leaf (else one line naming it)."""
    if tm.integer:
        if dtype.kind not in "iu":
            raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has dtype {dtype}, expected an integer type")
    elif ckpt.is_fp4(key):
        return
    elif dtype.kind not in "fV" and dtype.name != "bfloat16" and "float8" not in dtype.name:
        raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has dtype {dtype}, expected a floating-point "
                              f"type")


def check_keys(ckpt: HFCheckpoint, config: ModelConfig, maps: list[TensorMap]) -> None:
    """Fail on a missing or an extra tensor, naming it (and its file)."""
    wanted = {k for tm in maps for k, _ in tm.sources}
    have = set(ckpt.keys)
    missing = sorted(wanted - have)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: tensor '{missing[0]}'{more} missing from the checkpoint")
    extra = sorted(have - wanted - optional_hf_keys(config))
    if config.is_v4:  # V4's MTP module ("mtp.*") is not built yet: its tensors are skipped, as transformers does
        skipped = [k for k in extra if k.startswith("mtp.")]
        if skipped:
            warnings.warn(f"{ckpt.path}: skipping {len(skipped)} MTP tensors ('mtp.*'): DeepSeek-V4's MTP module is "
                          f"not implemented yet")
        extra = [k for k in extra if not k.startswith("mtp.")]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor '{extra[0]}'{more} (not part of a "
                              f"{config.model_type} model with this config.json)")


def drop_absent_mtp(ckpt: HFCheckpoint, config: ModelConfig) -> ModelConfig:
    """A checkpoint with no MTP tensors at all (transformers' ``save_pretrained`` writes none) loads as the
    main model only, with ``num_nextn_predict_layers = 0``; a partial MTP layer is still an error."""
    if config.num_nextn_predict_layers == 0 or config.is_v4:  # V4: its MTP module is not built (check_keys)
        return config
    prefix = f"model.layers.{config.num_hidden_layers}."
    if any(k.startswith(prefix) for k in ckpt.keys):
        return config
    warnings.warn(f"{ckpt.path}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                  f"checkpoint has no '{prefix}*' tensors; loading the main model only")
    return config.replace(num_nextn_predict_layers=0)


def iter_leaves(ckpt: HFCheckpoint, config: ModelConfig, maps: list[TensorMap], dtype=None,
                check_finite: bool = True) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """Yield ``(map, array)`` per leaf, filled one source tensor at a time (peak = one leaf + one source)."""
    for tm in maps:
        first = tm.sources[0][0]
        out = None
        for key, index in tm.sources:
            src = ckpt.read(key)
            if tuple(src.shape) != tuple(tm.hf_shape):
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has shape {list(src.shape)}, "
                                      f"expected {list(tm.hf_shape)} from config.json")
            check_dtype(ckpt, key, tm, src.dtype)
            if check_finite and not np.isfinite(src.astype(np.float32) if src.dtype.itemsize < 4 else src).all():
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' contains NaN or Inf")
            if out is None:
                out = np.empty(tm.shape, target_dtype(tm, ckpt.dtype(first), dtype))
            out[index] = tm.to_ours(np.asarray(src)).astype(out.dtype)
        yield tm, out


def set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
