"""Training data: a built-in arithmetic language, text/jsonl/npy readers, packing, seeded resumable batches.

Every source becomes a ``Corpus``: a stream of token ids (the files' memory maps, for ``.npy``) and the
offsets where documents start. Each epoch shuffles the documents (seeded by ``(seed, epoch)``), lays them end
to end as one stream, and cuts the stream into rows of ``seq_len + 1`` tokens (``pack_row_starts``) so that
every within-document next-token pair is a target exactly once per epoch. The rows of the epoch are then
shuffled too, by the same seed. Batches take consecutive rows of that order and run on into the next epoch, so
no row is dropped and the position in the data is two ints, ``(epoch, row_in_epoch)``; that is what
``Dataset.state()`` saves.

A batch is a dict of numpy arrays, each ``[B, T]`` with ``T = seq_len``: ``inputs``, ``targets`` (the inputs
shifted by one), ``positions`` (0, 1, 2... restarting at each document in the row), ``segment_ids``
(1, 2, 3... per document in the row, 0 for padding) and ``loss_mask`` (float32; 0 where the target is padding
or belongs to another document than the input).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

# ----- the built-in arithmetic language ------------------------------------------------------------------
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ARITHMETIC_CHARS = "0123456789+-*=\n"
ARITHMETIC_VOCAB_SIZE = 3 + len(ARITHMETIC_CHARS)
_CHAR_TO_ID = {ch: 3 + i for i, ch in enumerate(ARITHMETIC_CHARS)}
_ID_TO_CHAR = {i: ch for ch, i in _CHAR_TO_ID.items()}
_SPECIAL_NAMES = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}
_EQUALS_ID, _NEWLINE_ID = _CHAR_TO_ID["="], _CHAR_TO_ID["\n"]

DEFAULT_ARITHMETIC_DOCUMENTS = 20_000
ARITHMETIC_LOSSES = ("all", "answers")
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".npy")


class DataError(ValueError):
    """A data file or argument is unusable; the message names the file (and line) and what was expected."""


def arithmetic_text(seed: int, num_documents: int = DEFAULT_ARITHMETIC_DOCUMENTS,
                    max_lines: int = 8) -> list[str]:
    """``num_documents`` documents of 1..``max_lines`` lines like ``"12+47=59\\n"``, fixed by ``seed``.

    ``+`` and ``-`` take two-digit operands 10..99 (``a - b`` with ``a >= b``, so answers are never negative):
    with every operand the same width, the digits to add sit at fixed distances from ``=``, which a small model
    learns in hundreds of steps instead of thousands. ``*`` takes 0..12 (a table to learn). The operands are
    random, the answer is a function of them: a model that learns the language drives the loss on answer
    characters towards zero while operand digits stay at ~log(10).
    """
    rng = np.random.default_rng([_check_seed(seed), 0xA817])
    lines_per_doc = rng.integers(1, max_lines + 1, size=num_documents)
    n = int(lines_per_doc.sum())
    ops = rng.integers(0, 3, size=n)
    a, b = rng.integers(10, 100, size=n), rng.integers(10, 100, size=n)
    small_a, small_b = rng.integers(0, 13, size=n), rng.integers(0, 13, size=n)
    lines = []
    for op, x, y, sx, sy in zip(ops.tolist(), a.tolist(), b.tolist(), small_a.tolist(), small_b.tolist()):
        if op == 0:
            lines.append(f"{x}+{y}={x + y}\n")
        elif op == 1:
            x, y = max(x, y), min(x, y)
            lines.append(f"{x}-{y}={x - y}\n")
        else:
            lines.append(f"{sx}*{sy}={sx * sy}\n")
    ends = np.cumsum(lines_per_doc).tolist()
    return ["".join(lines[end - k:end]) for end, k in zip(ends, lines_per_doc.tolist())]


def encode(text: str) -> list[int]:
    """Arithmetic text -> ids, wrapped in BOS ... EOS (one document)."""
    unknown = sorted(set(text) - set(ARITHMETIC_CHARS))
    if unknown:
        raise DataError(f"characters {unknown} are not in the arithmetic vocabulary {ARITHMETIC_CHARS!r}")
    return [BOS_ID] + [_CHAR_TO_ID[ch] for ch in text] + [EOS_ID]


def arithmetic_tokenizer():
    """The arithmetic vocabulary as a ``tokenizers.Tokenizer`` (one token per character; ``<bos>``, ``<eos>``,
    ``<pad>`` special), so a model trained on the built-in data can be prompted like any checkpoint: the
    trainer saves it as ``tokenizer.json`` in the work directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {**{name: i for i, name in _SPECIAL_NAMES.items()}, **_CHAR_TO_ID}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=_SPECIAL_NAMES[PAD_ID]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([_SPECIAL_NAMES[i] for i in (PAD_ID, BOS_ID, EOS_ID)])
    bos = _SPECIAL_NAMES[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, BOS_ID)])
    return tok


def decode(ids, *, skip_special_tokens: bool = True) -> str:
    """Arithmetic ids -> text. Ids outside the vocabulary (an untrained model's guesses) print as U+FFFD."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i in _ID_TO_CHAR:
            out.append(_ID_TO_CHAR[i])
        elif i in _SPECIAL_NAMES:
            if not skip_special_tokens:
                out.append(_SPECIAL_NAMES[i])
        else:
            out.append("\ufffd")
    return "".join(out)


def arithmetic_answer_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """``[B, T]`` bool: the targets that are answer characters, i.e. come after ``=`` in the same line.

    The newline that ends an answer counts as one of its characters (knowing where the number stops is part
    of getting it right). Targets masked out by ``loss_mask`` never count.
    """
    inputs, seg = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
    t = np.arange(inputs.shape[1])[None, :]
    new_segment = np.ones_like(seg, dtype=bool)
    new_segment[:, 1:] = seg[:, 1:] != seg[:, :-1]
    last_equals = np.maximum.accumulate(np.where(inputs == _EQUALS_ID, t, -1), axis=1)
    last_reset = np.maximum.accumulate(np.where((inputs == _NEWLINE_ID) | new_segment, t, -1), axis=1)
    return (last_equals > last_reset) & (np.asarray(batch["loss_mask"]) > 0)


def arithmetic_accuracy(predictions, batch: dict[str, np.ndarray]) -> float:
    """Fraction of answer characters predicted right; ``predictions`` are greedy ids ``[B, T]`` or logits
    ``[B, T, V]`` (then argmax). NaN when the batch holds no answer character."""
    pred = np.asarray(predictions)
    if pred.ndim == 3:
        pred = pred.argmax(-1)
    if pred.shape != np.shape(batch["targets"]):
        raise DataError(f"predictions have shape {pred.shape}; expected {np.shape(batch['targets'])} "
                        "(or logits with a trailing vocab axis)")
    answer = arithmetic_answer_mask(batch)
    total = int(answer.sum())
    if total == 0:
        return float("nan")
    return float((answer & (pred == np.asarray(batch["targets"]))).sum()) / total


def arithmetic_exact_accuracy(predictions, batch: dict[str, np.ndarray]) -> tuple[float, int]:
    """Fraction of whole answers right, and how many answers were scored.

    An answer is the run of answer characters of one line (``arithmetic_answer_mask``, its newline included);
    it is right when every character is. Next-token predictions on the true prefix are right exactly when
    greedy decoding from ``"...a+b="`` writes the answer and stops the line, so this is the greedy answer
    accuracy. Answers cut off by the end of a row (no newline target) are not scored.
    """
    pred = np.asarray(predictions)
    if pred.ndim == 3:
        pred = pred.argmax(-1)
    answer = arithmetic_answer_mask(batch)
    targets = np.asarray(batch["targets"])
    right = pred == targets
    scored = correct = 0
    for r, t in zip(*np.nonzero(answer)):
        if t == 0 or not answer[r, t - 1]:  # an answer starts
            ok = True
        ok = ok and bool(right[r, t])
        if targets[r, t] == _NEWLINE_ID:  # and ends
            scored, correct = scored + 1, correct + int(ok)
    return (correct / scored if scored else float("nan")), scored


# ----- corpus: token ids and document offsets ---------------------------------------------------------
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


# ----- readers -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids put around each text document and used for padding (``None``: not added)."""

    bos: Optional[int]
    eos: Optional[int]
    pad: int


_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")


def tokenizer_special_ids(tokenizer) -> SpecialIds:
    """BOS / EOS / pad of a ``tokenizers.Tokenizer``, found among its special added tokens by name.

    DeepSeek's are ``<｜begin▁of▁sentence｜>`` (0), ``<｜end▁of▁sentence｜>`` (1) and ``<｜▁pad▁｜>`` (2). We add
    them ourselves and encode with ``add_special_tokens=False``, so a tokenizer whose post-processor also adds
    a BOS does not get two.
    """
    present = {tok.content: i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}

    def first(names):
        return next((present[n] for n in names if n in present), None)

    bos, eos, pad = first(_BOS_NAMES), first(_EOS_NAMES), first(_PAD_NAMES)
    return SpecialIds(bos=bos, eos=eos, pad=pad if pad is not None else (eos if eos is not None else 0))


def expand_source(source: Union[str, os.PathLike]) -> list[str]:
    """A file, a directory (its ``.txt``/``.jsonl``/``.npy`` files, recursively, sorted) or a glob pattern."""
    source = os.fspath(source)
    if any(ch in source for ch in "*?["):
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"data source {source!r}: the pattern matches no file")
    elif os.path.isdir(source):
        paths = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if os.path.isfile(p) and p.endswith(SUPPORTED_SUFFIXES))
        if not paths:
            raise FileNotFoundError(
                f"data source {source!r}: the directory holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    for p in paths:
        if not p.endswith(SUPPORTED_SUFFIXES):
            raise DataError(f"{p}: unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    return paths


def read_txt(path: str, documents: str = "paragraphs") -> list[str]:
    """Documents of a text file: separated by blank lines (``"paragraphs"``) or the whole file (``"file"``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if documents == "file":
        return [text] if text.strip() else []
    if documents != "paragraphs":
        raise DataError(f"txt_documents={documents!r}: expected 'paragraphs' or 'file'")
    return [p.strip("\n") for p in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if p.strip()]


def read_jsonl(path: str, text_field: str = "text") -> list[str]:
    """The ``text_field`` string of each line of a JSON-lines file; blank lines are skipped."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: expected an object with a {text_field!r} field, found {found}")
            if not isinstance(record[text_field], str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string, "
                                f"found {type(record[text_field]).__name__}")
            if record[text_field]:
                docs.append(record[text_field])
    return docs


CHAT_ROLES = ("system", "user", "assistant")


def _jsonl_records(path: str):
    """``(line number, record)`` per non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def is_chat_jsonl(path: str) -> bool:
    """Whether a ``.jsonl`` file holds chats: its first record is an object with a ``messages`` field."""
    for _, record in _jsonl_records(path):
        return isinstance(record, dict) and "messages" in record
    return False


def read_chat_jsonl(path: str) -> list[list[dict]]:
    """The ``messages`` of each line of a chat JSON-lines file: ``{"messages": [{"role": "system" | "user" |
    "assistant", "content": str}, ...]}``; every conversation needs at least one assistant message (the loss
    is on those only). Errors name the file, the line and the message."""
    chats = []
    for lineno, record in _jsonl_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict) or "messages" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: expected an object with a 'messages' list (the file's first line is a chat), "
                            f"found {found}")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list, found {json.dumps(messages)[:80]}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not {"role", "content"} <= set(m):
                found = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise DataError(f"{where}: message {i}: expected an object with 'role' and 'content', found {found}")
            if m["role"] not in CHAT_ROLES:
                raise DataError(f"{where}: message {i}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i}: 'content' must be a string, found "
                                f"{type(m['content']).__name__}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message; the loss is on assistant turns only, so this "
                            f"conversation would train nothing")
        chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return chats


def tokenize_chats(chats: Sequence[Sequence[dict]], tokenizer, special: SpecialIds,
                   style: str = "v3") -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids of each conversation rendered with the chat template ``style`` (``chat.render_with_spans``: BOS and
    the end-of-sentence tokens come from the template, with the tokenizer's own BOS / EOS strings), and per
    token whether it is a target of the loss: exactly the tokens of the assistant turns, i.e. each turn's
    content and the EOS that closes it (not the ``<｜Assistant｜>`` / ``Assistant:`` marker, not the system or
    user text). A token counts when its first character lies in an assistant span."""
    from .chat import render_with_spans

    if special.eos is None:
        raise DataError("chat data needs a tokenizer with an end-of-sentence token (the template closes each "
                        "assistant turn with it)")
    bos = tokenizer.id_to_token(special.bos) if special.bos is not None else ""
    eos = tokenizer.id_to_token(special.eos)
    rendered = [render_with_spans(m, style, add_generation_prompt=False, bos_token=bos, eos_token=eos)
                for m in chats]
    docs, masks = [], []
    for (text, spans), enc in zip(rendered, tokenizer.encode_batch([t for t, _ in rendered],
                                                                   add_special_tokens=False)):
        starts = np.array([o[0] for o in enc.offsets], np.int64)
        mask = np.zeros(starts.shape, bool)
        for a, b in spans:
            mask |= (starts >= a) & (starts < b)
        docs.append(list(enc.ids))
        masks.append(mask)
    return docs, masks


def read_npy(path: str, eos_id: Optional[int], vocab_size: Optional[int] = None) -> Corpus:
    """Pre-tokenized ids, memory-mapped: 1-D (documents end at each ``eos_id``, which stays in the document)
    or 2-D (each row is one document; rows of ``seq_len + 1`` tokens map onto batch rows one to one)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, found dtype {arr.dtype}")
    if arr.ndim == 2:
        tokens = arr.reshape(-1)
        starts = np.arange(arr.shape[0] + 1, dtype=np.int64) * arr.shape[1]
    elif arr.ndim == 1:
        if eos_id is None:
            raise DataError(f"{path}: a 1-D array needs an EOS id to split documents; pass eos_id=... "
                            "or a tokenizer that defines one")
        tokens = arr
        ends = np.flatnonzero(arr == eos_id) + 1
        starts = np.unique(np.concatenate([[0], ends, [arr.size]])).astype(np.int64)
    else:
        raise DataError(f"{path}: expected a 1-D or 2-D array of token ids, found shape {arr.shape}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = lo if lo < 0 else hi
            where = int(np.flatnonzero(tokens == bad)[0])
            raise DataError(f"{path}: token id {bad} at flat index {where} is outside [0, {vocab_size or 'inf'})")
    return Corpus.from_array(tokens, starts)


def tokenize_documents(texts: Sequence[str], tokenizer, special: SpecialIds) -> list[list[int]]:
    """``[BOS] + ids + [EOS]`` per text (either marker left out when the tokenizer has none)."""
    head = [special.bos] if special.bos is not None else []
    tail = [special.eos] if special.eos is not None else []
    return [head + enc.ids + tail for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def load_corpus(source, *, tokenizer=None, eos_id: Optional[int] = None, text_field: str = "text",
                txt_documents: str = "paragraphs", chat_style: str = "v3") -> tuple[Corpus, SpecialIds]:
    """Read every file of ``source`` (see ``expand_source``) into one corpus, in sorted file order.
    ``.jsonl`` files whose first record has ``messages`` are chats (``read_chat_jsonl``), rendered with the
    ``chat_style`` template and trained on the assistant's tokens only (``tokenize_chats``)."""
    special = tokenizer_special_ids(tokenizer) if tokenizer is not None else SpecialIds(None, eos_id, 0)
    if eos_id is not None:
        special = dataclasses.replace(special, eos=eos_id)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    parts = []
    for path in expand_source(source):
        if path.endswith(".npy"):
            parts.append(read_npy(path, special.eos, vocab))
            continue
        if tokenizer is None:
            raise DataError(f"{path}: text needs a tokenizer; pass tokenizer=tokenizers.Tokenizer.from_file(...)")
        if path.endswith(".jsonl") and is_chat_jsonl(path):
            docs, masks = tokenize_chats(read_chat_jsonl(path), tokenizer, special, chat_style)
            parts.append(Corpus.from_documents(docs, masks))
            continue
        texts = read_txt(path, txt_documents) if path.endswith(".txt") else read_jsonl(path, text_field)
        parts.append(Corpus.from_documents(tokenize_documents(texts, tokenizer, special)))
    corpus = Corpus.concatenate(parts)
    if corpus.num_tokens < 2:
        raise DataError(f"data source {os.fspath(source)!r}: holds {corpus.num_tokens} tokens; need at least 2")
    return corpus, special


# ----- packing and batching --------------------------------------------------------------------------------
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
    ``batch_size`` rows, ``b = batch_size // process_count``; the global batch does not depend on it.
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, vocab_size: Optional[int] = None,
                 special: SpecialIds = SpecialIds(BOS_ID, EOS_ID, PAD_ID),
                 decode: Optional[Callable[..., str]] = None,
                 loss_filter: Optional[Callable[[dict], np.ndarray]] = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("process_count", process_count)):
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise DataError(f"{name}={value!r}: expected a positive integer")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index}: expected 0 <= process_index < {process_count}")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
        if corpus.num_tokens < 2:
            raise DataError(f"the corpus holds {corpus.num_tokens} tokens; need at least 2")
        self.corpus = corpus
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), _check_seed(seed)
        self.shuffle = shuffle
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
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
        ours = range(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
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


# ----- entry point ---------------------------------------------------------------------------------------
def make_dataset(source: Union[str, os.PathLike, None] = None, *, seq_len: int, batch_size: int, seed: int = 0,
                 tokenizer=None, process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 eos_id: Optional[int] = None, text_field: str = "text", txt_documents: str = "paragraphs",
                 arithmetic_documents: int = DEFAULT_ARITHMETIC_DOCUMENTS, arithmetic_loss: str = "all",
                 chat_style: str = "v3") -> Dataset:
    """The training data iterator for ``source``:

    ``None`` or ``"arithmetic"``: the built-in arithmetic language (``arithmetic_documents`` documents made
    from ``seed``; vocabulary of ``ARITHMETIC_VOCAB_SIZE`` ids, ``decode`` for humans). ``arithmetic_loss``:
    "all" (every next token counts in the loss) or "answers" (only the answer characters, as in supervised
    fine-tuning: the operands are random, so predicting them only adds noise to the gradient).
    A path, directory or glob of ``.txt`` (documents split by blank lines, or ``txt_documents="file"``),
    ``.jsonl`` (``text_field`` of each line; or chats, ``{"messages": [...]}`` per line, rendered with the
    ``chat_style`` template of ``chat.py`` with the loss on the assistant's tokens only, see ``tokenize_chats``)
    and ``.npy`` (pre-tokenized) files. Text needs ``tokenizer`` (a
    ``tokenizers.Tokenizer``); BOS/EOS come from its special tokens. ``dataset.vocab_size`` is the
    tokenizer's size, or for ``.npy`` without a tokenizer the largest id + 1.
    """
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  process_index=process_index, process_count=process_count)
    if source is None or os.fspath(source) == "arithmetic":
        if tokenizer is not None:
            raise DataError("the arithmetic data has its own character vocabulary; pass tokenizer=None with it")
        if arithmetic_loss not in ARITHMETIC_LOSSES:
            raise DataError(f"arithmetic_loss={arithmetic_loss!r}: expected one of {ARITHMETIC_LOSSES}")
        corpus = Corpus.from_documents([encode(t) for t in arithmetic_text(seed, arithmetic_documents)])
        return Dataset(corpus, vocab_size=ARITHMETIC_VOCAB_SIZE, decode=decode, **common,
                       loss_filter=arithmetic_answer_mask if arithmetic_loss == "answers" else None)
    corpus, special = load_corpus(source, tokenizer=tokenizer, eos_id=eos_id, text_field=text_field,
                                  txt_documents=txt_documents, chat_style=chat_style)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    text_decode = _tokenizer_decode(tokenizer) if tokenizer is not None else None
    return Dataset(corpus, vocab_size=vocab, special=special, decode=text_decode, **common)


def _tokenizer_decode(tokenizer) -> Callable[..., str]:
    def decode_ids(ids, *, skip_special_tokens: bool = True) -> str:
        return tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=skip_special_tokens)
    return decode_ids


def _check_seed(seed) -> int:
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise DataError(f"seed={seed!r}: expected a non-negative integer")
    return int(seed)
