"""Data files into a ``Corpus``: ``.txt`` (documents split by blank lines), ``.jsonl`` (a text field, or chats
rendered with a chat template and trained on the assistant's tokens), ``.npy`` (pre-tokenized, memory-mapped).
``expand_source`` also lists the Parquet and ArrayRecord files that only the streaming pipeline reads
(``data/records.py``)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Optional, Sequence, Union

import numpy as np

from deepseek_jax.data.chat_template import render_with_spans
from deepseek_jax.data.corpus import Corpus, DataError, SpecialIds

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".npy", ".parquet", ".array_record")
STREAM_ONLY = (".parquet", ".array_record")
# ArrayRecord files, TFDS's shards included: ``name.array_record-00000-of-00008``.
ARRAY_RECORD = re.compile(r"\.array_record(-\d+-of-\d+)?$")


def is_array_record(path: str) -> bool:
    return ARRAY_RECORD.search(path) is not None


def is_data_file(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES) or is_array_record(path)


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


def data_special_ids(tokenizer, eos_id: Optional[int] = None) -> SpecialIds:
    """The tokenizer's BOS / EOS / pad (none but ``eos_id`` without one); ``eos_id``, when given, wins."""
    special = tokenizer_special_ids(tokenizer) if tokenizer is not None else SpecialIds(None, eos_id, 0)
    return dataclasses.replace(special, eos=eos_id) if eos_id is not None else special


def expand_source(source: Union[str, os.PathLike]) -> list[str]:
    """A file, a directory (its data files, ``SUPPORTED_SUFFIXES``, recursively, sorted) or a glob pattern."""
    source = os.fspath(source)
    if any(ch in source for ch in "*?["):
        paths = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"data source {source!r}: the pattern matches no file")
    elif os.path.isdir(source):
        paths = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if os.path.isfile(p) and is_data_file(p))
        if not paths:
            raise FileNotFoundError(
                f"data source {source!r}: the directory holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    for p in paths:
        if not is_data_file(p):
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
    """The ``text_field`` string of each line of a JSON-lines file; blank lines and empty texts are skipped."""
    texts = (text_of_record(record, f"{path}:{lineno}", text_field) for lineno, record in _jsonl_records(path))
    return [t for t in texts if t]


def text_of_record(record, where: str, text_field: str = "text") -> str:
    """The ``text_field`` string of one JSON-lines record (``where``: ``file:line``, for the error)."""
    if not isinstance(record, dict) or text_field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: expected an object with a {text_field!r} field, found {found}")
    if not isinstance(record[text_field], str):
        raise DataError(f"{where}: field {text_field!r} must be a string, found {type(record[text_field]).__name__}")
    return record[text_field]


CHAT_ROLES = ("system", "user", "assistant")


def _jsonl_records(path: str):
    """``(line number, record)`` per non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, parse_json_line(line, f"{path}:{lineno}")


def parse_json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def is_chat_jsonl(path: str) -> bool:
    """Whether a ``.jsonl`` file holds chats: its first record is an object with a ``messages`` field."""
    for _, record in _jsonl_records(path):
        return isinstance(record, dict) and "messages" in record
    return False


def read_chat_jsonl(path: str) -> list[list[dict]]:
    """The ``messages`` of each line of a chat JSON-lines file (``chat_of_record``)."""
    return [chat_of_record(record, f"{path}:{lineno}") for lineno, record in _jsonl_records(path)]


def chat_of_record(record, where: str) -> list[dict]:
    """The messages of one chat record: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str},
    ...]}``; every conversation needs at least one assistant message (the loss is on those only). Errors name
    ``where`` (the file and the line) and the message."""
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
            raise DataError(f"{where}: message {i}: 'content' must be a string, found {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message; the loss is on assistant turns only, so this "
                        f"conversation would train nothing")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize_chats(chats: Sequence[Sequence[dict]], tokenizer, special: SpecialIds,
                   style: str = "v3") -> tuple[list[list[int]], list[np.ndarray]]:
    """Ids of each conversation rendered with the chat template ``style`` (``chat_template.render_with_spans``: BOS and
    the end-of-sentence tokens come from the template, with the tokenizer's own BOS / EOS strings), and per
    token whether it is a target of the loss: exactly the tokens of the assistant turns, i.e. each turn's
    content and the EOS that closes it (not the ``<｜Assistant｜>`` / ``Assistant:`` marker, not the system or
    user text). A token counts when its first character lies in an assistant span."""
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
    special = data_special_ids(tokenizer, eos_id)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    parts = []
    for path in expand_source(source):
        if path.endswith(STREAM_ONLY) or is_array_record(path):
            raise DataError(f"{path}: Parquet and ArrayRecord files are read by the streaming pipeline only; "
                            f"use --pipeline grain (make_dataset(..., pipeline='grain'))")
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
