"""Rule-checked rewards for GRPO (R1's "verifiable rewards"), and the built-in task's prompts.

A reward function is a plain Python callable ``reward(prompt: str, completion: str, answer: str) -> float``
called once per sample on the decoded text; ``answer`` is the prompt's reference answer ("" when there is none).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from deepseek_jax.data.tasks.arithmetic import EOS_ID, NEWLINE_ID, encode_prompt

RewardFn = Callable[[str, str, str], float]


def exact_answer(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion, stripped of surrounding whitespace, is exactly the answer (R1's accuracy reward on
    problems with a deterministic result), else 0."""
    return float(completion.strip() == answer.strip())


_THINK = re.compile(r"^\s*<think>(.+?)</think>\s*(\S.*)$", re.DOTALL)


def think_format(prompt: str, completion: str, answer: str) -> float:
    """R1's format reward: 1 when the completion is ``<think>...</think>`` (non-empty reasoning) followed by a
    non-empty answer, else 0."""
    return float(_THINK.match(completion) is not None)


def think_answer(prompt: str, completion: str, answer: str) -> float:
    """Accuracy of the text after ``</think>`` (0 when the format is wrong)."""
    m = _THINK.match(completion)
    return float(m is not None and m.group(2).strip() == answer.strip())


def combine(*weighted: tuple[float, RewardFn]) -> RewardFn:
    """``sum_j w_j r_j``, e.g. ``combine((1.0, think_answer), (0.5, think_format))``."""
    def reward(prompt: str, completion: str, answer: str) -> float:
        return float(sum(w * fn(prompt, completion, answer) for w, fn in weighted))
    return reward


REWARDS: dict[str, RewardFn] = {
    "exact": exact_answer,
    "think-format": think_format,
    "think-exact": combine((1.0, think_answer), (0.5, think_format)),
}


# ----- the built-in arithmetic task ---------------------------------------------------------------------------
def arithmetic_questions(seed: int, n: int, stream: int = 0) -> tuple[list[str], list[str]]:
    """``n`` questions like ``"12+47="`` and their answers (``"59"``), drawn like ``data/tasks/arithmetic.py``'s lines
    (two-digit operands for + and -, 0..12 for *) from ``(seed, stream)``: GRPO's step ``s`` draws stream
    ``s + 1``, held-out evaluation stream 0 of another seed."""
    rng = np.random.default_rng([seed, stream, 0x6A90])
    ops = rng.integers(0, 3, size=n)
    a, b = rng.integers(10, 100, size=n), rng.integers(10, 100, size=n)
    sa, sb = rng.integers(0, 13, size=n), rng.integers(0, 13, size=n)
    questions, answers = [], []
    for op, x, y, u, v in zip(ops.tolist(), a.tolist(), b.tolist(), sa.tolist(), sb.tolist()):
        if op == 0:
            questions.append(f"{x}+{y}="), answers.append(str(x + y))
        elif op == 1:
            x, y = max(x, y), min(x, y)
            questions.append(f"{x}-{y}="), answers.append(str(x - y))
        else:
            questions.append(f"{u}*{v}="), answers.append(str(u * v))
    return questions, answers


def arithmetic_prompts(seed: int, n: int, stream: int = 0) -> tuple[list[list[int]], list[str]]:
    """Token ids of ``n`` arithmetic questions (BOS, then the characters: how a document starts) and answers."""
    questions, answers = arithmetic_questions(seed, n, stream)
    return [encode_prompt(q) for q in questions], answers


def arithmetic_stop_ids() -> list[int]:
    """An answer ends its line (newline) or the document (EOS)."""
    return [NEWLINE_ID, EOS_ID]


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          answers: Sequence[str]) -> np.ndarray:
    """``reward_fn`` on every sample, as a float32 array; a reward that is not a finite number is an error."""
    out = np.empty(len(completions), np.float32)
    for i, (p, c, a) in enumerate(zip(prompts, completions, answers)):
        r = float(reward_fn(p, c, a))
        if not np.isfinite(r):
            raise ValueError(f"reward function returned {r} for sample {i} (prompt {p!r}, completion {c!r})")
        out[i] = r
    return out
