"""deepseek_jax.generate_cli: ``deepseek-jax generate`` / ``chat`` print what ``generate`` produces."""

import io
import re
import sys

import numpy as np
from tiny_inference import tiny_checkpoint, word_tokenizer

from deepseek_jax.cli import main
from deepseek_jax.data.tokenizer import Tokenizer
from deepseek_jax.inference import chat
from deepseek_jax.inference.generation import generate


def test_generate_and_chat_commands(tmp_path, capsys, monkeypatch):
    config, params, _, path = tiny_checkpoint("tiny-v3")
    word_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path / "tokenizer.json")
    prompt = tok.encode(chat.render([{"role": "user", "content": "w5 w6"}], "r1"), add_bos=False)
    want = generate(config, params, [prompt], max_new_tokens=5, eos_token_id=tok.eos_id, tokenizer=tok)

    args = ["--checkpoint", path, "--tokenizer", str(tmp_path / "tokenizer.json"), "--max-new-tokens", "5", "--r1"]
    assert main(["generate", *args, "--prompt", "w5 w6"]) == 0
    out = capsys.readouterr()
    assert out.out == want.texts[0] + "\n"
    footer = re.search(r"decode (\d+) tok in [\d.]+s: first step [\d.]+s \(compile included\), then (\d+) tok in "
                       r"([\d.e-]+)s \(([\d.]+) tok/s\)", out.err)
    assert footer, out.err
    n, steady, secs, rate = int(footer[1]), int(footer[2]), float(footer[3]), float(footer[4])
    assert (n, steady) == (len(want.tokens[0]) - 1, len(want.tokens[0]) - 2)
    np.testing.assert_allclose(rate, steady / secs, rtol=0.01)  # as printed, rounded

    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6\n/exit\n"))
    assert main(["chat", *args]) == 0
    out = capsys.readouterr()
    assert f"assistant> {want.texts[0]}\n" in out.out
