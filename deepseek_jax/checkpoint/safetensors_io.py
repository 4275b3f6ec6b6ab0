"""A small, strict safetensors reader: memory-mapped, bf16 and fp8 included, errors that name file and tensor.

The format is ``u64 little-endian header size | JSON header | data``; each header entry gives dtype, shape
and ``data_offsets`` relative to the start of the data. We check every entry against the file size before
touching data, so a truncated shard or a header that lies about offsets fails with one clear line.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """Bad checkpoint input; the message names the file and, where there is one, the tensor."""


class TensorFile:
    """What every source file offers by name: keys, shape and dtype (``_entries[name]`` starts with
    ``(dtype, shape, ...)``); subclasses add ``nbytes`` and ``get``."""

    _entries: dict

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]


class SafetensorsFile(TensorFile):
    """Read-only view of one ``.safetensors`` file; ``get(name)`` returns a memory-mapped numpy array."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated: {size} bytes, not even a header length")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{self.path}: header length {n} does not fit in a {size}-byte file")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor '{name}': malformed header entry {info!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if start < 0 or end - start != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}': header offsets [{start}, {end}) hold {end - start} bytes, "
                    f"but {info['dtype']}{list(shape)} needs {nbytes}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}': ends at byte {end} of the data but the file holds only "
                    f"{data_size} (truncated?)"
                )
            self._entries[name] = (dtype, shape, start, end)
        self._mmap = None

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entries[name]
        return end - start

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self._data_start + start: self._data_start + end]
        return buf.view(dtype).reshape(shape)

    def close(self):
        self._mmap = None
