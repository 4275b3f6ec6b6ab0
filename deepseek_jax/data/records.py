"""Columnar and record-file sources for the streaming pipeline (``data/stream.py``): Parquet (``pyarrow``) and
ArrayRecord (``array-record``, Grain's own format), raw text, chats or pre-tokenized ids.

- **Parquet** (``.parquet``): one document per row, from the first column of these that the file has: the text
  field (``text`` unless ``--text-field`` names another; strings), ``messages`` (chats: lists of
  ``{"role", "content"}``) or ``input_ids`` (lists of token ids). A row is read with its whole row group, which is
  decoded once and kept while the pipeline reads that group's rows: so the shuffle of a Parquet source
  (``BlockOrder``) takes the row groups in a random order each epoch, and each group's rows in a random order,
  instead of a global permutation that would decode a row group per document.
- **ArrayRecord** (``.array_record``, or TFDS-style shards ``.array_record-00000-of-00008``): one document per
  record, each a UTF-8 JSON object with the same fields (``{"text": ...}``, ``{"messages": [...]}`` or
  ``{"input_ids": [...]}``). Records are read one by one (the format is made for random access), so the
  ordinary global shuffle applies.

Errors name the file and the row or record: ``data.parquet[row 17]: ...``.
"""

from __future__ import annotations

import bisect
import collections
import json
import threading
from typing import Optional

import numpy as np

from deepseek_jax.data.corpus import DataError
from deepseek_jax.data.readers import chat_of_record, parse_json_line, text_of_record

IDS_FIELD = "input_ids"


def ids_of_record(value, where: str, vocab_size: Optional[int]) -> np.ndarray:
    """A pre-tokenized document: a list of integer ids in ``[0, vocab_size)``."""
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value):
        raise DataError(f"{where}: field {IDS_FIELD!r} must be a list of integer token ids, found "
                        f"{json.dumps(value, default=str)[:80]}")
    ids = np.asarray(value, np.int64)
    if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise DataError(f"{where}: token id {bad} is outside [0, {vocab_size or 'inf'})")
    return ids.astype(np.int32)


def _document(kind: str, value, where: str, text_field: str, vocab_size: Optional[int]) -> dict:
    if kind == "messages":
        return {"messages": chat_of_record({"messages": value}, where)}
    if kind == IDS_FIELD:
        return {"ids": ids_of_record(value, where, vocab_size)}
    return {"text": text_of_record({text_field: value}, where, text_field)}


class ParquetDocuments:
    """The rows of a Parquet file as documents (a random-access Grain source); ``block_offsets`` are its row
    groups. The open file and the decoded groups are not pickled: each worker process opens its own."""

    CACHED_GROUPS = 4

    def __init__(self, path: str, text_field: str = "text", vocab_size: Optional[int] = None):
        import pyarrow.parquet as pq

        self.path, self.text_field, self.vocab_size = path, text_field, vocab_size
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError for a file that is not Parquet
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = meta.schema.to_arrow_schema().names
        self.column = next((c for c in (text_field, "messages", IDS_FIELD) if c in names), None)
        if self.column is None:
            raise DataError(f"{path}: expected a column {text_field!r} (text), 'messages' (chats) or "
                            f"{IDS_FIELD!r} (token ids); found columns {names}")
        self.kind = self.column if self.column in ("messages", IDS_FIELD) else "text"
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.block_offsets = np.cumsum([0] + sizes).astype(np.int64)
        self._init_cache()

    def _init_cache(self):
        self._file, self._groups, self._lock = None, collections.OrderedDict(), threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_file", "_groups", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return int(self.block_offsets[-1])

    def _group(self, g: int):
        with self._lock:  # Grain reads from several threads; a group is decoded once
            if g in self._groups:
                self._groups.move_to_end(g)
                return self._groups[g]
            if self._file is None:
                import pyarrow.parquet as pq

                self._file = pq.ParquetFile(self.path)
            rows = self._file.read_row_group(g, columns=[self.column]).column(0).to_pylist()
            self._groups[g] = rows
            if len(self._groups) > self.CACHED_GROUPS:
                self._groups.popitem(last=False)
            return rows

    def __getitem__(self, i: int) -> dict:
        g = bisect.bisect_right(self.block_offsets, i) - 1
        value = self._group(g)[i - int(self.block_offsets[g])]
        where = f"{self.path}[row {i}]"
        if value is None:
            raise DataError(f"{where}: column {self.column!r} is null")
        return _document(self.kind, value, where, self.text_field, self.vocab_size)


class ArrayRecordDocuments:
    """The records of an ArrayRecord file (JSON objects, see the module docstring) as documents; the kind
    (text, chats or ids) is that of the first record."""

    def __init__(self, path: str, text_field: str = "text", vocab_size: Optional[int] = None):
        self.path, self.text_field, self.vocab_size = path, text_field, vocab_size
        self._source = self._open()
        first = self._record(0) if len(self) else {}
        self.kind = ("messages" if "messages" in first else IDS_FIELD if IDS_FIELD in first and
                     text_field not in first else "text")

    def _open(self):
        from grain.sources import ArrayRecordDataSource

        try:
            return ArrayRecordDataSource([self.path])
        except Exception as e:  # array-record raises a bare RuntimeError / ValueError for a bad file
            raise DataError(f"{self.path}: not a readable ArrayRecord file ({e})") from None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._source = self._open()

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, i: int) -> dict:
        where = f"{self.path}[record {i}]"
        try:
            line = self._source[i].decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        record = parse_json_line(line, where)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
        return record

    def __getitem__(self, i: int) -> dict:
        record, where = self._record(i), f"{self.path}[record {i}]"
        field = {"text": self.text_field}.get(self.kind, self.kind)
        if field not in record:
            raise DataError(f"{where}: expected a {field!r} field (as the file's first record has), found "
                            f"{sorted(record)}")
        return _document(self.kind, record[field], where, self.text_field, self.vocab_size)


class BlockOrder:
    """The shuffled order of one host's documents when they come in blocks (Parquet row groups): ``order(index)``
    maps a position of the endless stream to a document. Each epoch (``index // len``) takes the blocks in a
    seeded random order and each block's documents in a seeded random order, so that reading stays within a
    block. The host's documents are ``shard::shards`` of all; a block keeps those of them it holds."""

    def __init__(self, block_offsets: np.ndarray, seed: int, shard: int = 0, shards: int = 1):
        local = np.maximum(-(-(np.asarray(block_offsets, np.int64) - shard) // shards), 0)  # ceil, per boundary
        self.starts, self.sizes = local[:-1], np.diff(local)
        self.size = int(local[-1])
        self.seed, self.shard, self.shards = int(seed), int(shard), int(shards)
        self._epoch, self._rows = None, collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"} | {"_epoch": None, "_rows": {}}

    def __setstate__(self, state):
        self.__dict__.update(state, _rows=collections.OrderedDict(), _lock=threading.Lock())

    def __len__(self) -> int:
        return self.size

    def _blocks(self, epoch: int):
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.sizes.size)
            self._epoch = (epoch, order, np.cumsum(self.sizes[order]) - self.sizes[order])
        return self._epoch[1:]

    def _within(self, epoch: int, block: int) -> np.ndarray:
        key = (epoch, block)
        if key not in self._rows:
            self._rows[key] = np.random.default_rng([self.seed, epoch, block + 1]).permutation(self.sizes[block])
            if len(self._rows) > 8:
                self._rows.popitem(last=False)
        return self._rows[key]

    def __call__(self, index: int) -> int:
        epoch, j = divmod(int(index), self.size)
        with self._lock:
            order, firsts = self._blocks(epoch)
            k = int(np.searchsorted(firsts, j, side="right")) - 1
            block = int(order[k])
            local = int(self.starts[block]) + int(self._within(epoch, block)[j - int(firsts[k])])
        return self.shard + local * self.shards


class ReadInOrder:
    """``(index, _) -> documents[order(index)]`` (Grain's ``map_with_index``)."""

    def __init__(self, documents, order: BlockOrder):
        self.documents, self.order = documents, order

    def __call__(self, index: int, _) -> dict:
        return self.documents[self.order(index)]
