"""Tiny random checkpoints shared by the inference tests (built once per test session, then cached), and a word-level
tokenizer whose ids fit them.

Each is a transformers model with sharper-than-default random weights (so greedy argmaxes are not near
ties), saved with ``save_pretrained`` (plus an MTP layer for V3) and loaded with ``load_pretrained``.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
import warnings

from hf_reference import hf_model, hf_mtp_model, save_with_mtp

import deepseek_jax as dsj
from deepseek_jax.data.chat_template import ASSISTANT, THINK_CLOSE, THINK_OPEN, USER
from deepseek_jax.data.tokenizer import BOS_TOKEN, EOS_TOKEN

# Prompts of mixed lengths (one of a single token) shared by the tests, so they share compiled steps.
PROMPTS = [[5, 17, 300, 2, 9, 44, 1, 8, 77, 3, 120], [3], [250, 11, 60, 2, 7, 7, 100]]


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(name: str, seed: int = 0):
    """``(config, params, hf_model, directory)`` for preset ``name``; V3 checkpoints carry an MTP layer."""
    config = dsj.presets[name]
    hf = hf_model(config, seed=seed, bias_scale=0.05 if config.model_type == "deepseek_v3" else 0.0,
                  init_std=0.1)
    path = tempfile.mkdtemp(prefix=f"dsj-{name}-")
    atexit.register(shutil.rmtree, path, True)
    if config.num_nextn_predict_layers > 0:
        save_with_mtp(hf, hf_mtp_model(hf, seed=seed + 1), path)
    else:
        hf.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_config, params = dsj.load_pretrained(path)
    return loaded_config, params, hf, path


def word_tokenizer(path, vocab_size=512):
    """A word-level tokenizer.json whose ids fit the tiny models' vocabulary, with DeepSeek's specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    specials = [BOS_TOKEN, EOS_TOKEN, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 1)]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]"] + words)}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.add_special_tokens(specials[:2])
    tk.add_tokens(specials[2:])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}))


def word_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """A learnable chat task over ``word_tokenizer``'s words: the answer to words w_i is the words w_{i+100}, one or
    two turns per chat after a system prompt."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "w1 w2"}]
        for _ in range(rng.choice((1, 2))):
            q = [rng.randrange(10, 60) for _ in range(4)]
            msgs.append({"role": "user", "content": " ".join(f"w{i}" for i in q)})
            msgs.append({"role": "assistant", "content": " ".join(f"w{i + 100}" for i in q)})
        out.append(msgs)
    return out


def engine_tokens(engine, prompts, max_tokens: int, timeout: float = 300.0) -> list[list[int]]:
    """Submit ``prompts`` to a started serving ``Engine``, wait (at most ``timeout`` s) until all finish, stop the
    engine, and return each prompt's generated tokens."""
    import time

    from deepseek_jax.inference.engine import Request

    out, done = {i: [] for i in range(len(prompts))}, set()
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(p, max_tokens, lambda text, tok, lp, fin, i=i: (
                out[i].append(tok) if tok is not None else None, fin and done.add(i))))
        deadline = time.time() + timeout
        while len(done) < len(prompts):
            assert time.time() < deadline, "the engine did not finish"
            time.sleep(0.05)
    finally:
        engine.stop()
    return [out[i] for i in range(len(prompts))]
