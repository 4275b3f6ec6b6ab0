"""Parquet and ArrayRecord sources of the Grain pipeline (``data/records.py``): the same documents, tokens and loss
flags as the same data in ``.jsonl``; the block shuffle that decodes each Parquet row group once per epoch; a
bit-identical resume; errors that name the file and the row or record."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_stream import _pairs_of, _stream_pairs, _tokenizer

from deepseek_jax.data import packing, readers, records, stream
from deepseek_jax.data.corpus import DataError


def _texts(n=23, seed=0):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(10, 400)}" for _ in range(rng.randrange(1, 25))) for _ in range(n)]


def _chats(n=9, seed=1):
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"w{rng.randrange(10, 400)} w{rng.randrange(10, 400)}"},
             {"role": "assistant", "content": " ".join(f"w{rng.randrange(10, 400)}" for _ in range(3))}]
            for _ in range(n)]


def _write_parquet(path, column, values, row_group_size=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: values}), str(path), row_group_size=row_group_size)
    return path


def _write_array_record(path, records_):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records_:
        writer.write(r if isinstance(r, bytes) else json.dumps(r).encode())
    writer.close()
    return path


def _write_jsonl(path, records_):
    path.write_text("".join(json.dumps(r) + "\n" for r in records_))
    return path


def _batches(source, tok, n, **kw):
    ds = packing.make_dataset(source, seq_len=8, batch_size=2, tokenizer=tok, pipeline="grain", **kw)
    return [next(ds) for _ in range(n)]


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_parquet_and_array_record_read_what_jsonl_reads(tmp_path, kind):
    """Texts and chats (their assistant flags included) from Parquet (several row groups) and from ArrayRecord: the
    pairs of the same records in ``.jsonl``, in order (shuffle off); ArrayRecord shuffled too, as it is read by
    record (the ordinary global shuffle: the very batches of the ``.jsonl``)."""
    tok = _tokenizer(tmp_path)
    values = _texts() if kind == "text" else _chats()
    recs = [{kind: v} for v in values]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", recs)
    parquet = _write_parquet(tmp_path / "d.parquet", kind, values)
    arec = _write_array_record(tmp_path / "d.array_record-00000-of-00001", recs)
    corpus, _ = readers.load_corpus(jsonl, tokenizer=tok)
    spans = list(zip(corpus.starts[:-1], corpus.starts[1:]))
    expected = _pairs_of([corpus.read(a, b - a) for a, b in spans],
                         [corpus.read_mask(a, b - a) for a, b in spans] if corpus.has_masks else None)
    n = -(-len(expected) // 16)
    reference = _batches(jsonl, tok, n, shuffle=False)
    assert _stream_pairs(reference)[:len(expected)] == expected
    for source in (parquet, arec):
        assert _stream_pairs(_batches(source, tok, n, shuffle=False)) == _stream_pairs(reference), source
    if kind == "messages":
        assert 0 < sum(f for *_, f in expected) < len(expected)
    for a, b in zip(_batches(jsonl, tok, 6, seed=5), _batches(arec, tok, 6, seed=5)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pre_tokenized_ids(tmp_path):
    """An ``input_ids`` column (Parquet) or field (ArrayRecord) is taken as it is: the pairs of those ids."""
    tok = _tokenizer(tmp_path)
    ids = [[3 + (7 * i + j) % 50 for j in range(2 + i % 5)] for i in range(11)]
    parquet = _write_parquet(tmp_path / "ids.parquet", "input_ids", ids)
    arec = _write_array_record(tmp_path / "ids.array_record", [{"input_ids": x} for x in ids])
    expected = _pairs_of(ids)
    for source in (parquet, arec):
        got = _stream_pairs(_batches(source, tok, -(-len(expected) // 16), shuffle=False))
        assert got[:len(expected)] == expected, source


def test_block_order_reads_each_row_group_once_per_epoch(tmp_path):
    """The Parquet shuffle: each epoch a permutation of the host's documents, every row group's documents one
    after another, a different order each epoch and fixed by the seed; reading in that order decodes each row
    group once per epoch. Two hosts' shards are disjoint and cover the file."""
    sizes = [4, 4, 4, 1, 4, 3]
    offsets = np.cumsum([0] + sizes)
    group_of = np.repeat(np.arange(len(sizes)), sizes)

    def epochs(seed, shard=0, shards=1, n=3):
        order = records.BlockOrder(offsets, seed, shard, shards)
        return [[order(e * len(order) + j) for j in range(len(order))] for e in range(n)]

    first = epochs(11)
    for epoch in first:
        assert sorted(epoch) == list(range(offsets[-1]))
        groups = [int(group_of[d]) for d in epoch]
        runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
        assert sorted(runs) == list(range(len(sizes)))  # each group one run
    assert first[0] != first[1] != first[2] and epochs(11) == first and epochs(12) != first
    halves = [epochs(11, s, 2, 1)[0] for s in (0, 1)]
    assert [d % 2 for d in halves[0]] == [0] * 10 and [d % 2 for d in halves[1]] == [1] * 10
    assert sorted(halves[0] + halves[1]) == list(range(offsets[-1]))

    import pyarrow.parquet as pq

    path = _write_parquet(tmp_path / "ids.parquet", "input_ids", [[d, d + 1] for d in range(20)], row_group_size=4)
    docs = records.ParquetDocuments(str(path))
    assert docs.block_offsets.tolist() == [0, 4, 8, 12, 16, 20]
    decoded = []

    class Counting:  # the file, counting the row groups decoded
        def read_row_group(self, g, **kw):
            decoded.append(g)
            return pq.ParquetFile(str(path)).read_row_group(g, **kw)

    docs._file, docs.CACHED_GROUPS = Counting(), 1  # one group held: a decode per run of a group's documents
    order = records.BlockOrder(docs.block_offsets, 3)
    got = [int(docs[order(j)]["ids"][0]) for j in range(40)]
    assert sorted(got[:20]) == sorted(got[20:]) == list(range(20))
    groups = [d // 4 for d in got]
    runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert sorted(decoded[:5]) == list(range(5)) and decoded == runs  # once per run of a group: 5 per epoch


def test_shuffled_parquet_resumes_bit_identically(tmp_path):
    """The block shuffle's position is Grain's iterator state: a pipeline restored from ``state()`` (through JSON)
    gives the batches the first would have given next, and one epoch holds every document once."""
    tok = _tokenizer(tmp_path)
    parquet = _write_parquet(tmp_path / "ids.parquet", "input_ids", [[1000 + i, i] for i in range(24)], 5)
    docs = stream.Documents([records.ParquetDocuments(str(parquet), vocab_size=2000)])

    def make():
        return stream.StreamDataset(docs, stream.Encode(tok, None), seq_len=4, batch_size=2, seed=4,
                                    vocab_size=2000)

    ds = make()
    first = [next(ds) for _ in range(3)]
    epoch = [a - 1000 for a, _, _ in _stream_pairs(first + [next(ds) for _ in range(3)])]
    assert sorted(epoch[:24]) == list(range(24))
    saved = json.loads(json.dumps(ds.state()))
    expected = [next(ds) for _ in range(4)]
    again = make().restore(saved)
    for a, b in zip(expected, [next(again) for _ in range(4)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_input_names_the_file_and_the_row(tmp_path):
    tok = _tokenizer(tmp_path)
    bad = _write_parquet(tmp_path / "bad.parquet", "body", ["a b", "c"])
    with pytest.raises(DataError, match=r"bad.parquet: expected a column 'text'.*found columns \['body'\]"):
        packing.make_dataset(bad, seq_len=8, batch_size=2, tokenizer=tok, pipeline="grain")
    nulls = _write_parquet(tmp_path / "nulls.parquet", "text", ["w10 w11", None, "w12"])
    ds = packing.make_dataset(nulls, seq_len=8, batch_size=1, tokenizer=tok, pipeline="grain", shuffle=False)
    with pytest.raises(DataError, match=r"nulls.parquet\[row 1\]: column 'text' is null"):
        next(ds)
    ids = _write_parquet(tmp_path / "ids.parquet", "input_ids", [[1, 2], [3, 10 ** 6]])
    ds = packing.make_dataset(ids, seq_len=8, batch_size=1, tokenizer=tok, pipeline="grain", shuffle=False)
    with pytest.raises(DataError, match=r"ids.parquet\[row 1\]: token id 1000000 is outside \[0, "):
        next(ds)
    arec = _write_array_record(tmp_path / "d.array_record", [{"text": "w10 w11"}, b"{not json", {"text": "w12"}])
    ds = packing.make_dataset(arec, seq_len=8, batch_size=1, tokenizer=tok, pipeline="grain", shuffle=False)
    with pytest.raises(DataError, match=r"d.array_record\[record 1\]: invalid JSON"):
        next(ds)
    with pytest.raises(DataError, match="streaming pipeline only; use --pipeline grain"):
        packing.make_dataset(arec, seq_len=8, batch_size=1, tokenizer=tok)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        packing.make_dataset(tmp_path / "junk.parquet", seq_len=8, batch_size=1, tokenizer=tok, pipeline="grain")
