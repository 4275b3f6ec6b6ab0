"""Token ids and document offsets: the ``Corpus`` every data source becomes, and the errors data code raises."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


class DataError(ValueError):
    """A data file or argument is unusable; the message names the file (and line) and what was expected."""


def check_seed(seed) -> int:
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise DataError(f"seed={seed!r}: expected a non-negative integer")
    return int(seed)


def check_batching(seq_len, batch_size, process_index, process_count, rows) -> tuple[int, int]:
    """The checks every loader makes of its batch arguments; returns this process's rows ``(start, stop)`` of the
    global batch (``rows``, or by default an equal block per process)."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("process_count", process_count)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise DataError(f"{name}={value!r}: expected a positive integer")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index}: expected 0 <= process_index < {process_count}")
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    if rows is None:
        b = batch_size // process_count
        rows = (process_index * b, (process_index + 1) * b)
    if not 0 <= int(rows[0]) < int(rows[1]) <= batch_size:
        raise DataError(f"rows={tuple(rows)}: expected 0 <= start < stop <= batch_size={batch_size}")
    return int(rows[0]), int(rows[1])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Document ``i`` spans ``[starts[i], starts[i+1])`` of the token stream, which is the concatenation of
    ``parts`` (each may be a read-only memmap: several ``.npy`` files are never copied into RAM).

    ``part_starts[j]`` is where part j begins in the stream; documents never straddle two parts.
    ``masks``: per part, ``None`` (every token may be a target) or a bool array beside its tokens that is True
    where the token counts as a target in the loss (supervised chat data: the assistant's tokens).
    """

    parts: tuple[np.ndarray, ...]
    starts: np.ndarray
    part_starts: np.ndarray
    masks: tuple[Optional[np.ndarray], ...] = ()

    @classmethod
    def from_array(cls, tokens: np.ndarray, starts: np.ndarray, mask: Optional[np.ndarray] = None) -> "Corpus":
        return cls((tokens,), np.asarray(starts, np.int64), np.array([0, tokens.size], np.int64), (mask,))

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]],
                       masks: Optional[Sequence[Sequence[bool]]] = None) -> "Corpus":
        """Documents of ids end to end; ``masks`` (one per document, same lengths): which tokens are targets."""
        docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in documents]
        keep = [i for i, d in enumerate(docs) if d.size]
        docs = [docs[i] for i in keep]
        lengths = np.array([d.size for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(docs) if docs else np.zeros((0,), np.int32)
        mask = None
        if masks is not None:
            kept = [np.asarray(masks[i], bool).reshape(-1) for i in keep]
            mask = np.concatenate(kept) if kept else np.zeros((0,), bool)
            if mask.shape != tokens.shape:
                raise DataError(f"masks hold {mask.size} flags for {tokens.size} tokens")
        return cls.from_array(tokens, starts, mask)

    def part_masks(self) -> tuple[Optional[np.ndarray], ...]:
        return self.masks if self.masks else (None,) * len(self.parts)

    @classmethod
    def concatenate(cls, corpora: Sequence["Corpus"]) -> "Corpus":
        """One corpus of several, end to end; their token arrays are kept as they are (memmaps stay mapped)."""
        if len(corpora) == 1:
            return corpora[0]
        offsets = np.cumsum([0] + [c.num_tokens for c in corpora])
        starts = np.concatenate([corpora[0].starts[:1]] + [c.starts[1:] + o for c, o in zip(corpora, offsets)])
        part_starts = np.concatenate([[0]] + [c.part_starts[1:] + o for c, o in zip(corpora, offsets)])
        return cls(tuple(p for c in corpora for p in c.parts), starts.astype(np.int64), part_starts.astype(np.int64),
                   tuple(m for c in corpora for m in c.part_masks()))

    def read(self, offset: int, n: int) -> np.ndarray:
        """Tokens ``[offset, offset + n)`` of the stream (a copy, int32)."""
        j = int(np.searchsorted(self.part_starts, offset, side="right")) - 1
        local = offset - int(self.part_starts[j])
        piece = np.asarray(self.parts[j][local:local + n], np.int32)
        if piece.size < n:  # runs on into the next part
            piece = np.concatenate([piece, self.read(offset + piece.size, n - piece.size)])
        return piece

    def read_mask(self, offset: int, n: int) -> np.ndarray:
        """Whether tokens ``[offset, offset + n)`` count as targets (bool; all True for plain text)."""
        j = int(np.searchsorted(self.part_starts, offset, side="right")) - 1
        local = offset - int(self.part_starts[j])
        mask = self.part_masks()[j]
        m = min(n, int(self.part_starts[j + 1]) - offset)
        piece = np.ones((m,), bool) if mask is None else np.asarray(mask[local:local + m], bool)
        if m < n:
            piece = np.concatenate([piece, self.read_mask(offset + m, n - m)])
        return piece

    @property
    def has_masks(self) -> bool:
        return any(m is not None for m in self.part_masks())

    def max_token(self) -> int:
        return max((int(p.max()) for p in self.parts if p.size), default=0)

    @property
    def num_documents(self) -> int:
        return self.starts.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids put around each text document and used for padding (``None``: not added)."""

    bos: Optional[int]
    eos: Optional[int]
    pad: int
