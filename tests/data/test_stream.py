"""The Grain pipeline (``make_dataset(..., pipeline="grain")``, ``data/stream.py``): the same documents, tokens and
loss flags as the in-memory loader; Grain's concat-then-split rows, by hand; a bit-identical resume (in-process and
with worker processes); each host's shard; errors that name the file and line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tiny_inference import word_tokenizer

from deepseek_jax.data import packing, readers, stream
from deepseek_jax.data.corpus import DataError
from deepseek_jax.training.config import TrainConfig


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer

    word_tokenizer(tmp_path)
    return Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


def _corpus_dir(tmp_path, rng=None):
    """Text, JSON lines, chats (in their own directory: a chat file decides its own kind) and a pre-tokenized
    array, with blank lines and an empty text among them."""
    rng = rng or random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(10, 400)}" for _ in range(n))

    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text(f"{words(7)}\n{words(3)}\n\n  \n{words(20)}\n\n\n{words(1)}\n")
    lines = [json.dumps({"text": words(rng.randrange(1, 30))}) for _ in range(12)]
    lines[3] = ""
    lines[5] = json.dumps({"text": ""})
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    np.save(d / "c.npy", np.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], np.int32))
    chats = d / "chats"
    chats.mkdir()
    with open(chats / "d.jsonl", "w") as f:
        for _ in range(5):
            f.write(json.dumps({"messages": [{"role": "user", "content": words(4)},
                                             {"role": "assistant", "content": words(rng.randrange(1, 6))}]}) + "\n")
    return d


def _pairs_of(documents, masks=None):
    """Every within-document (input, target, counts) triple, in document order."""
    out = []
    for i, d in enumerate(documents):
        flags = np.ones(len(d), bool) if masks is None or masks[i] is None else np.asarray(masks[i], bool)
        out += [(int(a), int(b), bool(f)) for a, b, f in zip(d[:-1], d[1:], flags[1:])]
    return out


def _stream_pairs(batches):
    out = []
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            keep = b["segment_ids"][row] > 0
            out += [(int(a), int(t), bool(m)) for a, t, m in zip(b["inputs"][row][keep], b["targets"][row][keep],
                                                                  b["loss_mask"][row][keep] > 0)]
    return out


@pytest.mark.parametrize("sub", [".", "chats"])
def test_documents_equal_the_memory_loader(tmp_path, sub):
    """The documents the pipeline reads and tokenizes one by one (text paragraphs, JSON lines, chats with their
    assistant flags, ``.npy`` rows) are the in-memory loader's, in the same order: unshuffled, one epoch of rows
    holds exactly its within-document pairs, each target's flag included."""
    tok = _tokenizer(tmp_path)
    source = _corpus_dir(tmp_path) / sub
    source = source / "d.jsonl" if sub == "chats" else source
    if sub == ".":  # the chats are a source of their own
        for p in (source / "chats").iterdir():
            p.unlink()
        (source / "chats").rmdir()
    corpus, _ = readers.load_corpus(source, tokenizer=tok)
    docs = [corpus.read(a, b - a) for a, b in zip(corpus.starts[:-1], corpus.starts[1:])]
    masks = [corpus.read_mask(a, b - a) for a, b in zip(corpus.starts[:-1], corpus.starts[1:])]
    expected = _pairs_of(docs, masks if corpus.has_masks else None)
    ds = packing.make_dataset(source, seq_len=8, batch_size=2, shuffle=False, tokenizer=tok, pipeline="grain")
    assert ds.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    rows = -(-len(expected) // 8)
    got = _stream_pairs([next(ds) for _ in range(-(-rows // 2))])
    assert got[:len(expected)] == expected
    if sub == "chats":
        assert 0 < sum(f for *_, f in expected) < len(expected)  # the user's turns do not count


def test_rows_are_grain_concat_then_split_by_hand():
    """Pairs packed end to end and cut every ``seq_len``: a document cut by a row's end goes on in the next row
    as segment 1, its positions starting again at 0 (as the in-memory loader's do)."""
    docs = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 9, 2]]
    ds = stream.StreamDataset(stream.ListDocuments(docs), stream.Encode(None, None), seq_len=4, batch_size=1,
                              shuffle=False, vocab_size=10)
    rows = [next(ds) for _ in range(5)]
    got = {k: [r[k][0].tolist() for r in rows] for k in rows[0]}
    assert got["inputs"] == [[1, 5, 6, 7], [1, 8, 1, 9], [9, 9, 9, 9], [9, 1, 5, 6], [7, 1, 8, 1]]
    assert got["targets"] == [[5, 6, 7, 2], [8, 2, 9, 9], [9, 9, 9, 9], [2, 5, 6, 7], [2, 8, 2, 9]]
    assert got["positions"] == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 0]]
    assert got["segment_ids"] == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1], [1, 2, 2, 2], [1, 2, 2, 3]]
    assert got["loss_mask"] == [[1.0] * 4] * 5


def _arithmetic(**kw):
    return packing.make_dataset(None, seq_len=32, batch_size=4, seed=3, pipeline="grain", **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(workers):
    """``state()`` after some batches, through JSON (as the checkpoint stores it), into a new pipeline: the next
    batches are the ones the first would have given; with worker processes too."""
    ds = _arithmetic(workers=workers)
    try:
        for _ in range(5):
            next(ds)
        saved = json.loads(json.dumps(ds.state()))
        expected = [next(ds) for _ in range(4)]
    finally:
        ds.close()
    again = _arithmetic(workers=workers).restore(saved)
    try:
        for a, b in zip(expected, [next(again) for _ in range(4)]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    finally:
        again.close()
    with pytest.raises(DataError, match="workers was"):
        _arithmetic(workers=1 - min(workers, 1)).restore(saved)
    memory = packing.make_dataset(None, seq_len=32, batch_size=4, seed=3)
    with pytest.raises(DataError, match="in-memory loader"):
        _arithmetic().restore(memory.state())
    with pytest.raises(DataError, match="saved by the grain pipeline"):
        memory.restore(saved)


def test_each_host_reads_its_shard():
    """Rows [2, 4) of a batch of 4 read documents 1, 3, 5... only, and their pairs in that order (shuffle off);
    a process feeding the same rows reads the same shard."""
    docs = [[i, 100 + i, 200 + i] for i in range(10)]

    def rows(r):
        ds = stream.StreamDataset(stream.ListDocuments(docs), stream.Encode(None, None), seq_len=4, batch_size=4,
                                  shuffle=False, vocab_size=300, rows=r)
        return [next(ds) for _ in range(3)]

    second = rows((2, 4))
    assert _stream_pairs(second)[:10] == _pairs_of(docs[1::2])
    assert _stream_pairs(rows((0, 2)))[:10] == _pairs_of(docs[0::2])
    np.testing.assert_array_equal(second[0]["inputs"], rows((2, 4))[0]["inputs"])
    with pytest.raises(DataError, match="equal block"):
        rows((1, 4))


def test_shuffle_changes_each_epoch_and_keeps_every_document():
    """Shuffled: each epoch is a permutation of the documents, a different one each epoch, fixed by the seed."""
    docs = [[1000 + i, i] for i in range(16)]  # one pair per document: the input names it

    def epochs(seed):
        ds = stream.StreamDataset(stream.ListDocuments(docs), stream.Encode(None, None), seq_len=4, batch_size=2,
                                  seed=seed, vocab_size=2000)
        order = [a - 1000 for a, _, _ in _stream_pairs([next(ds) for _ in range(8)])]
        return order[:16], order[16:32]

    first, second = epochs(7)
    assert sorted(first) == sorted(second) == list(range(16)) and first != second
    assert epochs(7) == (first, second) and epochs(8) != (first, second)


def test_mixture_proportions_within_one_percent(tmp_path):
    """Three sources mixed 0.7 / 0.2 / 0.1 (their sizes unlike the weights): over 10,000 documents each source's
    share is within 1% of its weight, the realized shares are what ``mixture_metrics`` reports, and the stream is
    fixed by the seed; the mixture resumes like a single source."""
    tok = _tokenizer(tmp_path)
    sizes = {"a": 50, "b": 400, "c": 7}
    for name, n in sizes.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"w{i % 300 + 10} w11"}) + "\n"
                                                         for i in range(n)))
    data = f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.jsonl:0.2,{tmp_path / 'c.jsonl'}:0.1"
    assert stream.parse_mixture(data) == [(str(tmp_path / f"{k}.jsonl"), w) for k, w in zip("abc", (0.7, .2, .1))]

    def make():  # documents of 4 tokens (BOS w w EOS): 3 pairs, 8 documents per row of 24 pairs
        return packing.make_dataset(data, seq_len=24, batch_size=25, tokenizer=tok, pipeline="grain", seed=1)

    ds = make()
    batches = [next(ds) for _ in range(50)]  # 50 x 25 x 8 = 10,000 documents
    assert int(ds.documents_read.sum()) == 10_000
    shares = ds.mixture_metrics()
    for (name, weight), share in zip(stream.parse_mixture(data), shares.values()):
        assert abs(share - weight) < 0.01, (name, share)
    assert list(shares) == [f"mix/{tmp_path}/{k}.jsonl" for k in "abc"]
    saved = json.loads(json.dumps(ds.state()))
    after = next(ds)
    again = make()
    np.testing.assert_array_equal(next(again)["inputs"], batches[0]["inputs"])
    again.restore(saved)
    np.testing.assert_array_equal(next(again)["inputs"], after["inputs"])
    assert again.mixture_metrics() == ds.mixture_metrics()
    with pytest.raises(DataError, match="has no weight"):
        stream.parse_mixture(f"{tmp_path}/a.jsonl:0.5,{tmp_path}/b.jsonl")
    with pytest.raises(DataError, match="weight > 0"):
        stream.parse_mixture(f"{tmp_path}/a.jsonl:0,{tmp_path}/b.jsonl:1")
    with pytest.raises(DataError, match="mixtures need pipeline='grain'"):
        packing.make_dataset(data, seq_len=24, batch_size=1, tokenizer=tok)


def test_a_bad_line_fails_when_read_naming_file_and_line(tmp_path):
    tok = _tokenizer(tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "w1 w2"}) + "\n\n" + '{"text": 3}\n')
    docs = stream.JsonlDocuments(str(path))
    assert len(docs) == 3 and docs[0] == {"text": "w1 w2"} and docs[1] == {"text": ""}
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'text' must be a string"):
        docs[2]
    path.write_text('{"text": "w1"}\n{"text": \n')
    ds = packing.make_dataset(path, seq_len=4, batch_size=1, shuffle=False, tokenizer=tok, pipeline="grain")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        next(ds)
    with pytest.raises(DataError, match="pipeline='grain'"):
        packing.make_dataset(path, seq_len=4, batch_size=1, tokenizer=tok, workers=2)
    with pytest.raises(DataError, match="expected one of"):
        packing.make_dataset(path, seq_len=4, batch_size=1, tokenizer=tok, pipeline="tf.data")


def test_documents_read_from_many_threads_at_once(tmp_path):
    """Grain reads documents from a pool of threads: each read stands alone (no shared file position)."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"w{i} " * (i % 17 + 1)}) + "\n" for i in range(400)))
    docs = stream.JsonlDocuments(str(path))
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(docs.__getitem__, list(range(400)) * 4))
    assert got == [{"text": f"w{i} " * (i % 17 + 1)} for i in range(400)] * 4


def test_txt_paragraphs_equal_read_txt(tmp_path):
    text = "a b\nc\n\n \t\nd\n\n\n  e  \nf\n \n"
    (tmp_path / "p.txt").write_text(text)
    for mode in ("paragraphs", "file"):
        docs = stream.TxtDocuments(str(tmp_path / "p.txt"), mode)
        assert [docs[i]["text"] for i in range(len(docs))] == readers.read_txt(str(tmp_path / "p.txt"), mode)


@pytest.mark.slow
def test_training_resumes_bit_identically_on_the_grain_pipeline(tmp_path):
    """``fit(pipeline="grain")`` on text: a run stopped after 4 steps (checkpoints every 2) and resumed gives the
    losses of a run straight through, to the bit: the Grain iterator's state travels in the checkpoint."""
    from train_helpers import CONFIG, TRAIN

    from deepseek_jax.training.run import fit

    tok = _tokenizer(tmp_path)
    source = _corpus_dir(tmp_path) / "b.jsonl"
    tc = TrainConfig(**{**TRAIN.__dict__, "steps": 6})
    config = CONFIG.replace(num_hidden_layers=1)
    kw = dict(data=str(source), tokenizer=tok, save_every=2, progress=False, async_save=False, pipeline="grain")

    def losses(workdir):
        with open(workdir / "metrics.jsonl") as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f)}

    fit(config, tc, str(tmp_path / "straight"), **kw)
    fit(config, tc, str(tmp_path / "stopped"), stop_after=4, **kw)
    assert sorted(losses(tmp_path / "stopped")) == [1, 2, 3, 4]
    fit(config, tc, str(tmp_path / "stopped"), **kw)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")
    assert sorted(losses(tmp_path / "straight")) == list(range(1, 7))
