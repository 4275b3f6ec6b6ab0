"""Streaming training data on Grain (``make_dataset(..., pipeline="grain")``): nothing is tokenized ahead of its
batch, and the host holds an index of where documents start, not their tokens.

- **Documents, read on demand.** Each file is indexed once by byte offset (``.jsonl``: its lines; ``.txt``: its
  paragraphs, or the whole file; ``.npy``: the memory map's documents, as ``read_npy`` splits them; Parquet and
  ArrayRecord: their rows and records, ``data/records.py``), and a document is read, parsed and checked only when
  the pipeline reaches it: a bad line fails as ``file:line`` then.
- **The Grain pipeline.** ``MapDataset.source`` over the documents (in sorted file order); this host's shard of
  them (``ds[shard::shards]``); a shuffle that changes every epoch (seeded by ``seed`` and the epoch; by row
  groups for Parquet, ``records.BlockOrder``); endless
  repetition; tokenization (``[BOS] + ids + [EOS]``, chats rendered with their template and flagged on the
  assistant's tokens, as ``readers.py`` does); packing with Grain's ``ConcatThenSplitIterDataset``; batching; and,
  with ``workers > 0``, all of it in that many worker processes (``mp_prefetch``).
- **What a row is.** Each document becomes its next-token pairs (``inputs = ids[:-1]``, ``targets = ids[1:]``,
  and whether each target counts), and the pairs are packed end to end into rows of ``seq_len``, a document cut
  where a row ends going on in the next. So every within-document pair is trained exactly once per epoch, as with
  the in-memory loader (``packing.py``), and a document's remainder in the next row starts its positions at 0
  again, as there. Unlike it, the rows of an epoch are not shuffled again after packing (the documents are), and
  rows hold pairs, not tokens: the in-memory loader's rows of ``seq_len + 1`` tokens overlap by one token where a
  document is cut, these do not, so the rows of an epoch differ (``tests/data/test_stream.py`` has both by hand).
- **The batch** is ``packing.py``'s: ``inputs``, ``targets``, ``positions``, ``segment_ids`` (1, 2... per document
  in the row) and ``loss_mask`` (float32: 1 where the pair is in a document and its target counts).
- **Resuming.** ``state()`` holds the Grain iterator's own state (JSON, saved in the training checkpoint), so a
  resumed run reads exactly the batches the stopped one would have read next. The batches depend on the worker
  count (each worker packs its own slice of the documents), so a run resumes with the count it was saved with.
- **Hosts.** A process feeding rows ``[start, stop)`` of the global batch reads shard ``start // (stop - start)``
  of ``batch_size // (stop - start)``: processes whose devices hold the same rows (the context or tensor axis
  spanning hosts) read the same shard and build the same rows.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from deepseek_jax.data.corpus import DataError, SpecialIds, check_batching, check_seed
from deepseek_jax.data.readers import (
    chat_of_record,
    data_special_ids,
    expand_source,
    is_array_record,
    parse_json_line,
    read_npy,
    text_of_record,
    tokenize_chats,
    tokenize_documents,
)
from deepseek_jax.data.records import ArrayRecordDocuments, BlockOrder, ParquetDocuments, ReadInOrder

# Packed per next-token pair: the pair, whether its target counts, which mixture source it came from, and whether it
# is its document's first (so documents are counted per source, a document cut by a row's end once).
PACKED = ("inputs", "targets", "weights", "source", "start")


def _line_starts(path: str) -> tuple[np.ndarray, int]:
    """Byte offsets where the lines of ``path`` start, and its size; read in 64 MB chunks (no line is decoded)."""
    starts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 26):
            starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(chunk)
    lines = np.concatenate(starts)
    return lines[lines < pos], pos


class _FileDocuments:
    """Documents of one file as byte ranges, read on demand (a random-access Grain source). The open file is not
    pickled: each worker process opens its own."""

    _file = None

    def __init__(self, path: str, spans: np.ndarray, linenos: np.ndarray):
        self.path, self.spans, self.linenos = path, spans, linenos  # spans: [n, 2] byte ranges
        self._file = None

    def __len__(self) -> int:
        return len(self.spans)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def _text(self, i: int) -> str:
        if self._file is None:
            self._file = open(self.path, "rb")
        a, b = (int(x) for x in self.spans[i])
        raw = os.pread(self._file.fileno(), b - a, a)  # no shared file position: Grain reads from several threads
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}:{int(self.linenos[i])}: not UTF-8 ({e.reason} at byte "
                            f"{a + e.start} of the file)") from None


class JsonlDocuments(_FileDocuments):
    """The lines of a ``.jsonl`` file: ``{"text": ...}`` each (``text_field``), or chats (``{"messages": [...]}``,
    when the first line is one). Blank lines and empty texts become empty documents, which the pipeline drops."""

    def __init__(self, path: str, text_field: str = "text"):
        starts, size = _line_starts(path)
        super().__init__(path, np.stack([starts, np.append(starts[1:], size)], 1), np.arange(1, starts.size + 1))
        self.text_field = text_field
        first = next((i for i in range(len(self)) if self._text(i).strip()), None)
        record = parse_json_line(self._text(first), f"{path}:{first + 1}") if first is not None else None
        self.chat = isinstance(record, dict) and "messages" in record

    def __getitem__(self, i: int) -> dict:
        line = self._text(i)
        if not line.strip():
            return {"text": ""}
        where = f"{self.path}:{int(self.linenos[i])}"
        record = parse_json_line(line, where)
        if self.chat:
            return {"messages": chat_of_record(record, where)}
        return {"text": text_of_record(record, where, self.text_field)}


class TxtDocuments(_FileDocuments):
    """A ``.txt`` file's paragraphs (runs of lines between blank or whitespace-only lines, as ``read_txt`` splits
    them) or, with ``documents="file"``, the whole file as one document."""

    def __init__(self, path: str, documents: str = "paragraphs"):
        if documents not in ("paragraphs", "file"):
            raise DataError(f"txt_documents={documents!r}: expected 'paragraphs' or 'file'")
        spans, linenos = [], []
        if documents == "file":
            spans, linenos = [(0, os.path.getsize(path))], [1]
        else:
            with open(path, "rb") as f:
                start = pos = 0
                lineno = first = 1
                for lineno, line in enumerate(f, start=1):
                    if not line.strip(b" \t\r\f\v\n"):
                        if pos > start:
                            spans.append((start, pos))
                            linenos.append(first)
                        start, first = pos + len(line), lineno + 1
                    pos += len(line)
                if pos > start:
                    spans.append((start, pos))
                    linenos.append(first)
        super().__init__(path, np.asarray(spans, np.int64).reshape(-1, 2), np.asarray(linenos, np.int64))
        self.whole = documents == "file"

    def __getitem__(self, i: int) -> dict:
        text = self._text(i)
        return {"text": (text if text.strip() else "") if self.whole else text.strip("\n")}


class NpyDocuments:
    """The documents of a pre-tokenized ``.npy`` (``read_npy``: 2-D rows, or 1-D split after each EOS), read from
    its memory map."""

    def __init__(self, path: str, eos_id: Optional[int], vocab_size: Optional[int]):
        self.corpus = read_npy(path, eos_id, vocab_size)
        self.max_token = self.corpus.max_token()

    def __len__(self) -> int:
        return self.corpus.num_documents

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.corpus.starts[i]), int(self.corpus.starts[i + 1])
        return {"ids": self.corpus.read(a, b - a)}


class ListDocuments:
    """Documents already in memory (the built-in arithmetic task's, as ids)."""

    def __init__(self, documents: Sequence[Sequence[int]]):
        self.documents = [np.asarray(d, np.int32) for d in documents]

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.documents[i]}


class Documents:
    """Several sources end to end, as one random-access source (the files of a directory or glob, in order)."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()
        # Where blocks read together start (Parquet row groups; other documents are blocks of one), or None.
        self.block_offsets = None
        if any(getattr(s, "block_offsets", None) is not None for s in self.sources):
            self.block_offsets = np.unique(np.concatenate(
                [np.asarray(getattr(s, "block_offsets", None) if getattr(s, "block_offsets", None) is not None
                            else np.arange(len(s) + 1)) + off for s, off in zip(self.sources, self.offsets)]))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict:
        j = bisect.bisect_right(self.offsets, i) - 1
        return self.sources[j][i - self.offsets[j]]


def open_documents(source, *, tokenizer=None, eos_id: Optional[int] = None, text_field: str = "text",
                   txt_documents: str = "paragraphs") -> Documents:
    """Index every file of ``source`` (``expand_source``) without reading its documents."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    parts = []
    for path in expand_source(source):
        if path.endswith(".npy"):
            parts.append(NpyDocuments(path, eos_id, vocab))
            continue
        if tokenizer is None:
            raise DataError(f"{path}: text needs a tokenizer; pass tokenizer=tokenizers.Tokenizer.from_file(...)")
        if path.endswith(".parquet"):
            parts.append(ParquetDocuments(path, text_field, vocab))
        elif is_array_record(path):
            parts.append(ArrayRecordDocuments(path, text_field, vocab))
        elif path.endswith(".txt"):
            parts.append(TxtDocuments(path, txt_documents))
        else:
            parts.append(JsonlDocuments(path, text_field))
    return Documents(parts)


class Encode:
    """A document -> its next-token pairs (``inputs``, ``targets``, ``weights``: 1 where the target counts), or None
    for one of fewer than 2 tokens. Runs in the Grain workers; the tokenizer travels to them pickled."""

    def __init__(self, tokenizer, special: SpecialIds, chat_style: str = "v3"):
        self.tokenizer, self.special, self.chat_style = tokenizer, special, chat_style

    def __call__(self, doc: dict) -> Optional[dict]:
        mask = None
        if "ids" in doc:
            ids = np.asarray(doc["ids"], np.int32)
        elif "messages" in doc:
            docs, masks = tokenize_chats([doc["messages"]], self.tokenizer, self.special, self.chat_style)
            ids, mask = np.asarray(docs[0], np.int32), masks[0]
        else:
            if not doc["text"]:
                return None
            ids = np.asarray(tokenize_documents([doc["text"]], self.tokenizer, self.special)[0], np.int32)
        if ids.size < 2:
            return None
        weights = np.ones(ids.size - 1, np.int32) if mask is None else np.asarray(mask[1:], np.int32)
        start = np.zeros(ids.size - 1, np.int32)
        start[0] = 1
        source = np.full(ids.size - 1, doc.get("source", 0), np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights, "source": source, "start": start}


class Tag:
    """Marks a mixture component's documents with its index."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, doc: dict) -> dict:
        return {**doc, "source": self.source}


def parse_mixture(data: str) -> Optional[list[tuple[str, float]]]:
    """``"web/*.jsonl:0.7,code.jsonl:0.2,math/:0.1"`` -> ``[(source, weight), ...]``; None for a single source
    named without a weight. Weights are positive and need not sum to 1 (they are normalized)."""
    parts = [p.strip() for p in str(data).split(",")]
    out = []
    for part in parts:
        path, sep, weight = part.rpartition(":")
        try:
            value = float(weight) if sep else None
        except ValueError:
            value = None
        if value is None:
            if len(parts) > 1:
                raise DataError(f"--data {data!r}: {part!r} has no weight; a mixture is source:weight,source:weight")
            return None
        if not path or not value > 0:
            raise DataError(f"--data {data!r}: {part!r}: expected source:weight with a weight > 0")
        out.append((path, value))
    return out


def _present(x) -> bool:
    return x is not None


class ToBatch:
    """Grain's packed and batched features -> ``packing.py``'s batch dict (``loss_filter``: the task's own mask)."""

    def __init__(self, loss_filter: Optional[Callable[[dict], np.ndarray]] = None):
        self.loss_filter = loss_filter

    def __call__(self, packed: dict) -> dict:
        seg = np.asarray(packed["inputs_segment_ids"], np.int32)
        batch = {
            "inputs": np.asarray(packed["inputs"], np.int32),
            "targets": np.asarray(packed["targets"], np.int32),
            "positions": np.asarray(packed["inputs_positions"], np.int32),
            "segment_ids": seg,
            "loss_mask": ((seg > 0) & (np.asarray(packed["weights"]) > 0)).astype(np.float32),
            "source": np.where(seg > 0, np.asarray(packed["source"], np.int32), -1),
            "doc_start": np.asarray(packed["start"], np.int32) * (seg > 0),
        }
        if self.loss_filter is not None:
            batch["loss_mask"] = batch["loss_mask"] * self.loss_filter(batch).astype(np.float32)
        return batch


class StreamDataset:
    """An endless, seeded, resumable iterator of packed batches built by Grain (see the module docstring); the
    interface of ``packing.Dataset``."""

    def __init__(self, documents, encode: Encode, *, seq_len: int, batch_size: int, seed: int = 0,
                 mixture: Optional[Sequence[tuple[str, float]]] = None,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 rows: Optional[tuple[int, int]] = None, vocab_size: int, workers: int = 0,
                 decode: Optional[Callable[..., str]] = None,
                 loss_filter: Optional[Callable[[dict], np.ndarray]] = None):
        import grain
        from grain.experimental import ConcatThenSplitIterDataset

        if not (isinstance(workers, (int, np.integer)) and workers >= 0):
            raise DataError(f"workers={workers!r}: expected a non-negative integer")
        start, stop = check_batching(seq_len, batch_size, process_index, process_count, rows)
        local = stop - start
        if batch_size % local or start % local:
            raise DataError(f"rows={(start, stop)}: expected an equal block of the batch of {batch_size} rows")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), check_seed(seed)
        self.rows, self.local_batch_size = (start, stop), local
        self.vocab_size, self.decode, self.workers = int(vocab_size), decode, int(workers)
        self.shard, self.shards = start // local, batch_size // local
        components = list(documents) if mixture is not None else [documents]
        self.names = [name for name, _ in mixture] if mixture is not None else ["data"]
        weights = [w for _, w in mixture] if mixture is not None else [1.0]
        if len(components) != len(weights):
            raise DataError(f"{len(components)} sources for {len(weights)} mixture weights")
        self.weights = [w / sum(weights) for w in weights]
        self.num_documents = sum(len(c) for c in components)
        parts = []
        for k, docs in enumerate(components):
            if len(docs) < self.shards:
                raise DataError(f"{self.names[k]}: holds {len(docs)} documents, fewer than the {self.shards} "
                                f"shards the batch's row blocks read")
            blocks = getattr(docs, "block_offsets", None)
            if shuffle and blocks is not None:  # Parquet: row groups in a random order, rows within each
                order = BlockOrder(blocks, self.seed + k, self.shard, self.shards)
                ds = grain.MapDataset.range(len(order)).repeat(None).map_with_index(ReadInOrder(docs, order))
            else:
                ds = grain.MapDataset.source(docs)
                if self.shards > 1:
                    ds = ds[self.shard::self.shards]
                if shuffle:
                    ds = ds.shuffle(seed=self.seed + k)
                ds = ds.repeat(None)
            parts.append(ds.map(Tag(k)))
        ds = grain.MapDataset.mix(parts, self.weights) if len(parts) > 1 else parts[0]
        ds = ds.map(encode).filter(_present)
        it = ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={k: self.seq_len for k in PACKED})
        it = it.batch(local, drop_remainder=True).map(ToBatch(loss_filter))
        if self.workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we are not an absl app
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self._iter = iter(it)
        self.documents_read = np.zeros(len(components), np.int64)  # per source, since the run began

    def __iter__(self) -> "StreamDataset":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        source, start = batch.pop("source"), batch.pop("doc_start")
        self.documents_read += np.bincount(source[start > 0], minlength=self.documents_read.size)
        return batch

    def mixture_metrics(self) -> dict[str, float]:
        """The share of documents each source has given so far (``mix/<source>``), for the metrics log; empty
        for one source."""
        if len(self.names) < 2:
            return {}
        total = max(int(self.documents_read.sum()), 1)
        return {f"mix/{name}": float(n) / total for name, n in zip(self.names, self.documents_read)}

    def state(self) -> dict:
        """The Grain iterator's state (a JSON string) and what ``restore`` checks it against."""
        return {"pipeline": "grain", "iterator": json.dumps(self._iter.get_state()), "seed": self.seed,
                "seq_len": self.seq_len, "num_documents": self.num_documents, "workers": self.workers,
                "shard": self.shard, "shards": self.shards, "weights": json.dumps(self.weights),
                "documents_read": json.dumps(self.documents_read.tolist())}

    def restore(self, state: dict) -> "StreamDataset":
        """Continue from ``state()``: the next batches are those the saved iterator would have yielded next."""
        if state.get("pipeline") != "grain":
            raise DataError("cannot restore data state: it was saved by the in-memory loader; resume with the "
                            "pipeline the run started with")
        mine = self.state()
        for key in ("seed", "seq_len", "num_documents", "workers", "shard", "shards"):
            if int(state[key]) != mine[key]:
                raise DataError(f"cannot restore data state: {key} was {int(state[key])} when it was saved, "
                                f"this pipeline has {mine[key]}")
        if json.loads(state["weights"]) != self.weights:
            raise DataError(f"cannot restore data state: the mixture weights were {state['weights']} when it was "
                            f"saved, this pipeline has {self.weights}")
        self._iter.set_state(_from_json(json.loads(state["iterator"])))
        self.documents_read = np.asarray(json.loads(state["documents_read"]), np.int64)
        return self

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def _from_json(state):
    """A Grain state read back from JSON: the packer's ``remainder_slices`` as tuples again (Grain compares them
    with ``(-1, -1)``, which a JSON list never equals)."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in x.items()} if k == "remainder_slices" else _from_json(x))
                for k, x in state.items()}
    return [_from_json(x) for x in state] if isinstance(state, list) else state


def stream_dataset(source, *, tokenizer, eos_id: Optional[int], text_field: str, txt_documents: str,
                   chat_style: str, **common) -> StreamDataset:
    """``make_dataset(pipeline="grain")`` for files: the documents indexed, the tokenizer's specials, its vocab."""
    special = data_special_ids(tokenizer, eos_id)
    mixture = parse_mixture(source)
    docs = [open_documents(path, tokenizer=tokenizer, eos_id=special.eos, text_field=text_field,
                           txt_documents=txt_documents) for path, _ in (mixture or [(source, 1.0)])]
    if tokenizer is not None:
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        vocab = max((s.max_token for d in docs for s in d.sources), default=0) + 1
    return StreamDataset(docs if mixture else docs[0], Encode(tokenizer, special, chat_style), mixture=mixture,
                         vocab_size=vocab, **common)
