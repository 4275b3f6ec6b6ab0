"""Scoring a model trained on the built-in arithmetic data: exact held-out answers and a few sample answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.data.packing import make_dataset
from deepseek_jax.data.tasks.arithmetic import (
    NEWLINE_ID,
    arithmetic_exact_accuracy,
    arithmetic_text,
    decode,
    encode_prompt,
)
from deepseek_jax.models.transformer import Transformer


def evaluate_arithmetic(config: ModelConfig, params, *, seed: int = 12345, batches: int = 4, batch_size: int = 32,
                        seq_len: int = 128, samples: int = 6, options: ModelOptions = ModelOptions()) -> dict:
    """How well a model trained on the built-in data does arithmetic, on documents drawn with another seed.

    ``exact``: the fraction of held-out answers that greedy decoding gets entirely right (every digit and the
    line end; ``arithmetic_exact_accuracy`` over ``batches`` batches, ``answers`` of them scored).
    ``samples``: a few ``(question, model's greedy answer, right answer)`` strings, each question asked alone
    after BOS.
    """
    model = Transformer(config, options)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    held_out = make_dataset(None, seq_len=seq_len, batch_size=batch_size, seed=seed)
    right = scored = 0
    for _ in range(batches):
        b = next(held_out)
        acc, n = arithmetic_exact_accuracy(apply(params, b["inputs"], b["positions"], b["segment_ids"]), b)
        right, scored = right + (acc * n if n else 0), scored + n
    lines = [line for doc in arithmetic_text(seed + 1, num_documents=samples) for line in doc.splitlines()]
    lines = lines[:samples]
    questions = [line[: line.index("=") + 1] for line in lines]
    width = max(len(q) for q in questions) + 1 + 5  # BOS, the question, an answer of up to 4 digits and "\n"
    tokens = np.zeros((len(questions), width), np.int32)
    for i, q in enumerate(questions):
        tokens[i, : len(q) + 1] = encode_prompt(q)
    at = np.array([len(q) + 1 for q in questions])
    done = np.zeros(len(questions), bool)
    for _ in range(5):  # greedy, one fixed-shape forward per new character (causal: padding is never seen)
        logits = np.asarray(apply(params, jnp.asarray(tokens)))
        nxt = logits[np.arange(len(questions)), at - 1].argmax(-1)
        for i in np.flatnonzero(~done & (at < width)):
            tokens[i, at[i]] = nxt[i]
            done[i] = nxt[i] == NEWLINE_ID
            at[i] += 1
    answers = [decode(tokens[i, len(q) + 1: at[i]]).rstrip("\n") for i, q in enumerate(questions)]
    return {"exact": right / max(scored, 1), "answers": scored,
            "samples": [(q, a, line[len(q):]) for q, a, line in zip(questions, answers, lines)]}
