"""PyTorch state dicts (``.bin`` / ``.pt`` / ``.pth``) as a checkpoint source, read only with
``torch.load(weights_only=True)`` (no arbitrary code from a pickle) and memory-mapped where the file allows it.

``TorchFile`` offers the same small interface as ``SafetensorsFile`` so ``HFCheckpoint``'s key handling,
FP8 dequantization and error messages apply unchanged. torch is imported only when such a file is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint.hf_dir import HFCheckpoint, open_indexed_files
from deepseek_jax.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    TensorFile,
)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TORCH_INDEX = "pytorch_model.bin.index.json"
RELEASE_BYTES = 256 * 1024 * 1024  # unmap a torch file after this many bytes read from it


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading PyTorch .bin/.pt/.pth files needs torch (pip install torch)") from None
    return torch


def _to_numpy(t) -> np.ndarray:
    torch = _torch()
    views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
             torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    t = t.detach()
    if t.dtype in views:
        as_int, np_dtype = views[t.dtype]
        return t.contiguous().view(as_int).numpy().view(np_dtype)
    return t.contiguous().numpy()


class TorchFile(TensorFile):
    """One pickled state dict; tensors are converted to numpy on ``get`` (zero-copy where possible)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._sd = None
        self._read_since_load = 0
        sd = self._load()
        self._entries = {}
        for k, v in sd.items():
            self._entries[k] = (_np_dtype(v.dtype, self.path, k), tuple(int(s) for s in v.shape),
                                v.numel() * v.element_size())

    def _load(self):
        if self._sd is not None:
            return self._sd
        torch = _torch()
        import pickle
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: cannot open (file does not exist)")
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: refused: the pickle holds more than a plain state dict "
                                  f"(torch.load weights_only=True says: {first})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: cannot read as a PyTorch state dict (truncated or corrupt?): "
                                  f"{first}") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{self.path}: holds a {type(sd).__name__}, not a plain state dict "
                                  f"(a mapping of tensor names to tensors)")
        for k, v in sd.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {k!r} is a {type(v).__name__}, not a tensor: not a plain "
                                      f"state dict (nested dicts, optimizer state and the like are refused)")
        self._sd = sd
        return sd

    def nbytes(self, name: str) -> int:
        return self._entries[name][2]

    def get(self, name: str) -> np.ndarray:
        self._read_since_load += self.nbytes(name)
        return _to_numpy(self._load()[name])

    def close(self):
        # Re-unpickling is O(number of tensors), so unmap only once enough pages have been touched.
        if self._read_since_load >= RELEASE_BYTES:
            self._sd = None
            self._read_since_load = 0


def _np_dtype(torch_dtype, path: str, key: str) -> np.dtype:
    torch = _torch()
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float64: np.float64, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
             torch.float8_e5m2: ml_dtypes.float8_e5m2, torch.int64: np.int64, torch.int32: np.int32,
             torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
             torch.float8_e8m0fnu: ml_dtypes.float8_e8m0fnu}
    if torch_dtype not in table:
        raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {torch_dtype}")
    return np.dtype(table[torch_dtype])


class FilesCheckpoint(HFCheckpoint):
    """``HFCheckpoint`` over an explicit set of files (safetensors or torch), with or without an index."""

    def __init__(self, path: str, files: dict[str, object]):
        self.path = os.fspath(path)
        self._files = files
        self._index({k: fname for fname, f in files.items() for k in f.keys()})


def _open_file(path: str):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchFile(path)


def open_files_checkpoint(src: str) -> FilesCheckpoint:
    """A torch source (file, directory with one state dict, or ``pytorch_model.bin.index.json``), or a single
    ``.safetensors`` file given by path."""
    src = os.fspath(src)
    if os.path.isfile(src):
        return FilesCheckpoint(os.path.dirname(src) or ".", {os.path.basename(src): _open_file(src)})
    index = os.path.join(src, TORCH_INDEX)
    if os.path.exists(index):
        files, weight_map = open_indexed_files(index, _open_file)
        ckpt = FilesCheckpoint(src, files)
        names = {f: k for k, f in ckpt._name.items()}  # name in the file -> name here
        extra = sorted(set(names) - set(weight_map))
        if extra:
            raise CheckpointError(f"{ckpt.file_of(names[extra[0]])}: tensor '{extra[0]}' is not listed in "
                                  f"{TORCH_INDEX}")
        return ckpt
    found = sorted(f for f in os.listdir(src) if f.endswith(TORCH_SUFFIXES))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)}) and no {TORCH_INDEX} for"
        raise CheckpointError(f"{src}: {what} PyTorch state dict files (.bin/.pt/.pth) found")
    return FilesCheckpoint(src, {found[0]: TorchFile(os.path.join(src, found[0]))})
