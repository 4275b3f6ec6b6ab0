"""``deepseek-jax eval``: the perplexity and bits per byte of a checkpoint equal transformers' on the same ids, each
document scored on its own as BOS + document + EOS (a long one in pieces); on a mesh too; clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_inference import tiny_checkpoint, word_tokenizer

from deepseek_jax.cli import main

SEQ_LEN = 16
TEXTS = ["w5 w6 w7", "w100", " ".join(f"w{10 + 7 * i % 300}" for i in range(40)), "w42 w43 w44 w45 w46 w47 w48",
         "w9 w8"]


def _data(tmp_path):
    word_tokenizer(tmp_path)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + json.dumps({"text": ""}) + "\n")
    return data, str(tmp_path / "tokenizer.json")


def _reference(hf, tokenizer_path):
    """transformers' summed NLL and token count: each document's [BOS] + ids + [EOS], in pieces of SEQ_LEN pairs
    scored on their own."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    nll, count = 0.0, 0
    for text in TEXTS:
        ids = [tok.token_to_id("<｜begin▁of▁sentence｜>")] + tok.encode(text, add_special_tokens=False).ids + \
              [tok.token_to_id("<｜end▁of▁sentence｜>")]
        for a in range(0, len(ids) - 1, SEQ_LEN):
            piece = ids[a:a + SEQ_LEN + 1]
            with torch.no_grad():
                logits = hf(torch.tensor([piece[:-1]])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            nll -= float(logp[torch.arange(len(piece) - 1), torch.tensor(piece[1:])].sum())
            count += len(piece) - 1
    return nll, count


def _parse(out: str) -> dict:
    ppl = re.search(r"perplexity: ([\d.e+-]+) over (\d+) tokens \((\d+) documents, (\d+) device", out)
    bpb = re.search(r"bits per byte: ([\d.e+-]+) over (\d+) bytes", out)
    assert ppl and bpb, out
    return {"ppl": float(ppl[1]), "tokens": int(ppl[2]), "documents": int(ppl[3]), "devices": int(ppl[4]),
            "bpb": float(bpb[1]), "bytes": int(bpb[2])}


def test_perplexity_equals_transformers(tmp_path, capsys):
    _, _, hf, path = tiny_checkpoint("tiny-v3")
    data, tok = _data(tmp_path)
    assert main(["eval", path, "--data", str(data), "--tokenizer", tok, "--seq-len", str(SEQ_LEN),
                 "--batch-size", "2", "--no-progress"]) == 0
    got = _parse(capsys.readouterr().out)
    nll, count = _reference(hf, tok)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert (got["tokens"], got["documents"], got["bytes"]) == (count, len(TEXTS), n_bytes)
    assert count == sum(len(t.split()) + 1 for t in TEXTS) and count > 3 * SEQ_LEN  # the long one in pieces
    np.testing.assert_allclose(got["ppl"], math.exp(nll / count), rtol=1e-5)
    np.testing.assert_allclose(got["bpb"], nll / math.log(2) / n_bytes, rtol=1e-5)


def test_bad_input(tmp_path, capsys):
    _, _, _, path = tiny_checkpoint("tiny-v3")
    data, tok = _data(tmp_path)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "w5"},
                                              {"role": "assistant", "content": "w6"}]}) + "\n")
    assert main(["eval", path, "--data", str(chats), "--tokenizer", tok]) == 2
    assert "holds chats; eval scores plain text" in capsys.readouterr().err
    assert main(["eval", path, "--data", str(tmp_path / "none.jsonl"), "--tokenizer", tok]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    big = tmp_path / "big.npy"
    np.save(big, np.array([[3, 4, 100000]], np.int32))
    assert main(["eval", path, "--data", str(big), "--tokenizer", tok]) == 2
    assert "is outside [0, 512)" in capsys.readouterr().err


@pytest.mark.slow
def test_on_a_mesh_equals_one_device(tmp_path, capsys):
    """On 8 simulated devices (``--mesh fsdp=2,expert=4``, the params sharded by the training rules): the same
    figures as on one."""
    _, _, _, path = tiny_checkpoint("tiny-v3")
    data, tok = _data(tmp_path)
    args = ["eval", path, "--data", str(data), "--tokenizer", tok, "--seq-len", str(SEQ_LEN), "--batch-size", "8",
            "--no-progress"]
    assert main(args) == 0
    one = _parse(capsys.readouterr().out)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", *args, "--mesh", "fsdp=2,expert=4"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = _parse(proc.stdout)
    assert eight["devices"] == 8 and one["devices"] == 1
    assert (eight["tokens"], eight["bytes"]) == (one["tokens"], one["bytes"])
    np.testing.assert_allclose([eight["ppl"], eight["bpb"]], [one["ppl"], one["bpb"]], rtol=1e-5)
