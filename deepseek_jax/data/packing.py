"""Packing documents into rows, and the seeded, resumable iterator of training batches (``make_dataset``).

Every source becomes a ``Corpus`` (``corpus.py``; the files are read by ``readers.py``): a stream of token ids (the
files' memory maps, for ``.npy``) and the offsets where documents start. Each epoch shuffles the documents (seeded by
``(seed, epoch)``), lays them end to end as one stream, and cuts the stream into rows of ``seq_len + 1`` tokens
(``pack_row_starts``) so that every within-document next-token pair is a target exactly once per epoch. The rows of
the epoch are then shuffled too, by the same seed. Batches take consecutive rows of that order and run on into the
next epoch, so no row is dropped and the position in the data is two ints, ``(epoch, row_in_epoch)``; that is what
``Dataset.state()`` saves.

A batch is a dict of numpy arrays, each ``[B, T]`` with ``T = seq_len``: ``inputs``, ``targets`` (the inputs
shifted by one), ``positions`` (0, 1, 2... restarting at each document in the row), ``segment_ids``
(1, 2, 3... per document in the row, 0 for padding) and ``loss_mask`` (float32; 0 where the target is padding
or belongs to another document than the input).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Union

import numpy as np

from deepseek_jax.data.corpus import Corpus, DataError, SpecialIds, check_batching, check_seed
from deepseek_jax.data.readers import load_corpus
from deepseek_jax.data.stream import Encode, ListDocuments, StreamDataset, parse_mixture, stream_dataset
from deepseek_jax.data.tasks.arithmetic import (
    ARITHMETIC_LOSSES,
    ARITHMETIC_VOCAB_SIZE,
    BOS_ID,
    DEFAULT_ARITHMETIC_DOCUMENTS,
    EOS_ID,
    PAD_ID,
    arithmetic_answer_mask,
    arithmetic_text,
    decode,
    encode,
)

PIPELINES = ("memory", "grain")


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
    doc_order: np.ndarray  # [num_documents] document ids in stream order
    stream_starts: np.ndarray  # [num_documents + 1] where each of them starts in the stream
    row_starts: np.ndarray  # [rows] where each row starts in the stream, in stream order
    row_order: np.ndarray  # [rows] which of those rows is the epoch's i-th


def pack_row_starts(stream_starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Stream offsets of the rows of ``seq_len + 1`` tokens that cover a stream of documents.

    A row that ends inside a document is followed by one starting at its last token, so that token's own
    target is trained in the next row; a row that ends on a document boundary is followed by one starting
    right there (the pair across the boundary is masked anyway). Documents of ``seq_len + 1`` tokens, such
    as the rows of a 2-D ``.npy``, therefore fill one row each.
    """
    total, t1 = int(stream_starts[-1]), seq_len + 1
    starts, at = [], 0
    while True:
        starts.append(at)
        end = at + t1
        if end >= total:
            return np.asarray(starts, np.int64)
        k = int(np.searchsorted(stream_starts, end))
        at = end if int(stream_starts[k]) == end else end - 1


class Dataset:
    """An endless, seeded, resumable iterator of packed batches (see the module docstring).

    With ``process_count > 1`` each process yields rows ``[p*b, (p+1)*b)`` of every global batch of
    ``batch_size`` rows, ``b = batch_size // process_count``; or, with ``rows=(start, stop)``, exactly those rows
    (what ``Trainer.process_rows`` says a process's devices hold: several processes may feed the same rows, when
    the context or tensor axis spans them). The global batch does not depend on either.
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, rows: Optional[tuple[int, int]] = None,
                 vocab_size: Optional[int] = None,
                 special: SpecialIds = SpecialIds(BOS_ID, EOS_ID, PAD_ID),
                 decode: Optional[Callable[..., str]] = None,
                 loss_filter: Optional[Callable[[dict], np.ndarray]] = None):
        self.rows = check_batching(seq_len, batch_size, process_index, process_count, rows)
        if corpus.num_tokens < 2:
            raise DataError(f"the corpus holds {corpus.num_tokens} tokens; need at least 2")
        self.corpus = corpus
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), check_seed(seed)
        self.shuffle = shuffle
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.rows[1] - self.rows[0]
        self.special = special
        self.vocab_size = int(vocab_size) if vocab_size is not None else corpus.max_token() + 1
        self.decode = decode
        self.loss_filter = loss_filter  # batch -> [B, T] bool: the targets that count in the loss
        self._lengths = np.diff(corpus.starts)
        self._epoch, self._row = 0, 0
        self._plans: dict[int, _EpochPlan] = {}

    # ----- position in the data ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._epoch

    def rows_in_epoch(self, epoch: int) -> int:
        """Rows of ``seq_len + 1`` tokens in ``epoch``; it can differ a little between shuffled epochs."""
        return int(self._plan(epoch).row_starts.size)

    def state(self) -> dict[str, int]:
        """Plain ints to save in a checkpoint; the last four only guard ``restore`` against other data."""
        return {
            "epoch": self._epoch,
            "row_in_epoch": self._row,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_documents": self.corpus.num_documents,
            "num_tokens": self.corpus.num_tokens,
        }

    def restore(self, state: dict[str, Any]) -> "Dataset":
        """Continue from ``state()``: the next batches are those the saved iterator would have yielded next
        (the batch size may differ from the saved run's; batches are cut from the same row order)."""
        if state.get("pipeline", "memory") != "memory":
            raise DataError(f"cannot restore data state: it was saved by the {state['pipeline']} pipeline; resume "
                            f"with the pipeline the run started with")
        mine = self.state()
        for key in ("seed", "seq_len", "num_documents", "num_tokens"):
            if key in state and int(state[key]) != mine[key]:
                raise DataError(f"cannot restore data state: {key} was {int(state[key])} when it was saved, "
                                f"this dataset has {mine[key]}")
        epoch, row = int(state["epoch"]), int(state["row_in_epoch"])
        if epoch < 0 or not 0 <= row < self.rows_in_epoch(epoch):
            raise DataError(f"cannot restore data state: epoch={epoch}, row_in_epoch={row} out of range "
                            f"(epoch {max(epoch, 0)} has {self.rows_in_epoch(max(epoch, 0))} rows)")
        self._epoch, self._row = epoch, row
        return self

    # ----- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> "Dataset":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ours = range(*self.rows)
        rows = []
        for i in range(self.batch_size):
            if i in ours:
                rows.append(self._pack_row(self._epoch, self._row))
            self._row += 1
            if self._row == self.rows_in_epoch(self._epoch):
                self._epoch, self._row = self._epoch + 1, 0
        seg = np.stack([r[2] for r in rows])
        batch = {
            "inputs": np.stack([r[0][:-1] for r in rows]),
            "targets": np.stack([r[0][1:] for r in rows]),
            "positions": np.stack([r[1][:-1] for r in rows]),
            "segment_ids": seg[:, :-1],
            "loss_mask": ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)).astype(np.float32),
        }
        if self.corpus.has_masks:  # chat data: only targets that are the assistant's tokens count
            batch["loss_mask"] = batch["loss_mask"] * np.stack([r[3][1:] for r in rows]).astype(np.float32)
        if self.loss_filter is not None:
            batch["loss_mask"] = batch["loss_mask"] * self.loss_filter(batch).astype(np.float32)
        return batch

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            n = self.corpus.num_documents
            doc_order = rng.permutation(n) if self.shuffle else np.arange(n)
            stream_starts = np.concatenate([[0], np.cumsum(self._lengths[doc_order])])
            row_starts = pack_row_starts(stream_starts, self.seq_len)
            row_order = rng.permutation(row_starts.size) if self.shuffle else np.arange(row_starts.size)
            # A batch spans at most two epochs, so the previous epoch's plan is the only other one needed.
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = _EpochPlan(doc_order, stream_starts, row_starts, row_order)
        return self._plans[epoch]

    def _pack_row(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, positions, segment ids and target flags (``Corpus.masks``; each ``[T + 1]``) of the epoch's
        i-th row, padded at the end."""
        plan = self._plan(epoch)
        t1 = self.seq_len + 1
        begin = int(plan.row_starts[plan.row_order[i]])
        end = min(begin + t1, self.corpus.num_tokens)
        tokens = np.full((t1,), self.special.pad, np.int32)
        positions = np.zeros((t1,), np.int32)
        segments = np.zeros((t1,), np.int32)
        trainable = np.zeros((t1,), bool)
        k = int(np.searchsorted(plan.stream_starts, begin, side="right")) - 1
        at, segment = begin, 1
        while at < end:
            piece_end = min(int(plan.stream_starts[k + 1]), end)
            offset = int(self.corpus.starts[plan.doc_order[k]]) + at - int(plan.stream_starts[k])
            n, lo = piece_end - at, at - begin
            tokens[lo:lo + n] = self.corpus.read(offset, n)
            if self.corpus.has_masks:
                trainable[lo:lo + n] = self.corpus.read_mask(offset, n)
            # A document split across rows restarts at position 0 too: RoPE sees only relative positions,
            # and attention cannot reach the earlier part anyway.
            positions[lo:lo + n] = np.arange(n)
            segments[lo:lo + n] = segment
            at, segment, k = piece_end, segment + 1, k + 1
        return tokens, positions, segments, trainable


def make_dataset(source: Union[str, os.PathLike, None] = None, *, seq_len: int, batch_size: int, seed: int = 0,
                 tokenizer=None, process_index: int = 0, process_count: int = 1,
                 rows: Optional[tuple[int, int]] = None, shuffle: bool = True,
                 eos_id: Optional[int] = None, text_field: str = "text", txt_documents: str = "paragraphs",
                 arithmetic_documents: int = DEFAULT_ARITHMETIC_DOCUMENTS, arithmetic_loss: str = "all",
                 chat_style: str = "v3", pipeline: str = "memory", workers: int = 0):
    """The training data iterator for ``source``:

    ``None`` or ``"arithmetic"``: the built-in arithmetic language (``arithmetic_documents`` documents made
    from ``seed``; vocabulary of ``ARITHMETIC_VOCAB_SIZE`` ids, ``decode`` for humans). ``arithmetic_loss``:
    "all" (every next token counts in the loss) or "answers" (only the answer characters, as in supervised
    fine-tuning: the operands are random, so predicting them only adds noise to the gradient).
    A path, directory or glob of ``.txt`` (documents split by blank lines, or ``txt_documents="file"``),
    ``.jsonl`` (``text_field`` of each line; or chats, ``{"messages": [...]}`` per line, rendered with the
    ``chat_style`` template of ``chat_template.py`` with the loss on the assistant's tokens only, see
    ``tokenize_chats``)
    and ``.npy`` (pre-tokenized) files; with ``pipeline="grain"`` also Parquet and ArrayRecord (``records.py``:
    text, chats or ``input_ids``). Text needs ``tokenizer`` (a
    ``tokenizers.Tokenizer``); BOS/EOS come from its special tokens. ``dataset.vocab_size`` is the
    tokenizer's size, or for ``.npy`` without a tokenizer the largest id + 1.

    ``pipeline``: ``"memory"`` (this module's ``Dataset``: every document tokenized up front) or ``"grain"``
    (``stream.py``'s ``StreamDataset``: documents read and tokenized as the batches need them, ``workers`` Grain
    worker processes; its rows differ, see there).
    """
    if pipeline not in PIPELINES:
        raise DataError(f"pipeline={pipeline!r}: expected one of {PIPELINES}")
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  process_index=process_index, process_count=process_count, rows=rows)
    if pipeline == "grain":
        common["workers"] = workers
    elif workers:
        raise DataError("workers: the in-memory loader has none; pass pipeline='grain'")
    if source is None or os.fspath(source) == "arithmetic":
        if tokenizer is not None:
            raise DataError("the arithmetic data has its own character vocabulary; pass tokenizer=None with it")
        if arithmetic_loss not in ARITHMETIC_LOSSES:
            raise DataError(f"arithmetic_loss={arithmetic_loss!r}: expected one of {ARITHMETIC_LOSSES}")
        documents = [encode(t) for t in arithmetic_text(seed, arithmetic_documents)]
        task = dict(vocab_size=ARITHMETIC_VOCAB_SIZE, decode=decode,
                    loss_filter=arithmetic_answer_mask if arithmetic_loss == "answers" else None)
        if pipeline == "grain":
            return StreamDataset(ListDocuments(documents), Encode(None, SpecialIds(BOS_ID, EOS_ID, PAD_ID)),
                                 **task, **common)
        return Dataset(Corpus.from_documents(documents), **task, **common)
    if pipeline != "grain" and parse_mixture(source):
        raise DataError(f"data {os.fspath(source)!r} is a mixture of sources; mixtures need pipeline='grain'")
    if pipeline == "grain":
        text_decode = _tokenizer_decode(tokenizer) if tokenizer is not None else None
        return stream_dataset(source, tokenizer=tokenizer, eos_id=eos_id, text_field=text_field,
                              txt_documents=txt_documents, chat_style=chat_style, decode=text_decode, **common)
    corpus, special = load_corpus(source, tokenizer=tokenizer, eos_id=eos_id, text_field=text_field,
                                  txt_documents=txt_documents, chat_style=chat_style)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    text_decode = _tokenizer_decode(tokenizer) if tokenizer is not None else None
    return Dataset(corpus, vocab_size=vocab, special=special, decode=text_decode, **common)


def _tokenizer_decode(tokenizer) -> Callable[..., str]:
    def decode_ids(ids, *, skip_special_tokens: bool = True) -> str:
        return tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=skip_special_tokens)
    return decode_ids
