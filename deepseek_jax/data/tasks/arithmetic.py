"""The built-in arithmetic language: the main job's training data (``deepseek-jax train`` with no ``--data``), its
character vocabulary and tokenizer, and the answer masks and accuracies that score a model on it."""

from __future__ import annotations

import numpy as np

from deepseek_jax.data.corpus import DataError, check_seed

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ARITHMETIC_CHARS = "0123456789+-*=\n"
ARITHMETIC_VOCAB_SIZE = 3 + len(ARITHMETIC_CHARS)
_CHAR_TO_ID = {ch: 3 + i for i, ch in enumerate(ARITHMETIC_CHARS)}
_ID_TO_CHAR = {i: ch for ch, i in _CHAR_TO_ID.items()}
_SPECIAL_NAMES = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}
# tokenizer_config.json beside the saved vocabulary: which of its tokens begin and end a document
ARITHMETIC_TOKENIZER_CONFIG = {"bos_token": _SPECIAL_NAMES[BOS_ID], "eos_token": _SPECIAL_NAMES[EOS_ID],
                               "pad_token": _SPECIAL_NAMES[PAD_ID]}
EQUALS_ID, NEWLINE_ID = _CHAR_TO_ID["="], _CHAR_TO_ID["\n"]

DEFAULT_ARITHMETIC_DOCUMENTS = 20_000
ARITHMETIC_LOSSES = ("all", "answers")


def arithmetic_text(seed: int, num_documents: int = DEFAULT_ARITHMETIC_DOCUMENTS,
                    max_lines: int = 8) -> list[str]:
    """``num_documents`` documents of 1..``max_lines`` lines like ``"12+47=59\\n"``, fixed by ``seed``.

    ``+`` and ``-`` take two-digit operands 10..99 (``a - b`` with ``a >= b``, so answers are never negative):
    with every operand the same width, the digits to add sit at fixed distances from ``=``, which a small model
    learns in hundreds of steps instead of thousands. ``*`` takes 0..12 (a table to learn). The operands are
    random, the answer is a function of them: a model that learns the language drives the loss on answer
    characters towards zero while operand digits stay at ~log(10).
    """
    rng = np.random.default_rng([check_seed(seed), 0xA817])
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


def encode_prompt(text: str) -> list[int]:
    """A question to complete (``"33+58="``) -> ids: BOS and the characters, no EOS."""
    return encode(text)[:-1]


def arithmetic_tokenizer():
    """The arithmetic vocabulary as a ``tokenizers.Tokenizer`` (one token per character; ``<bos>``, ``<eos>``,
    ``<pad>`` special), so a model trained on the built-in data can be prompted like any checkpoint: the
    trainer saves it as ``tokenizer.json`` in the work directory."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

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
    last_equals = np.maximum.accumulate(np.where(inputs == EQUALS_ID, t, -1), axis=1)
    last_reset = np.maximum.accumulate(np.where((inputs == NEWLINE_ID) | new_segment, t, -1), axis=1)
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
        if targets[r, t] == NEWLINE_ID:  # and ends
            scored, correct = scored + 1, correct + int(ok)
    return (correct / scored if scored else float("nan")), scored
