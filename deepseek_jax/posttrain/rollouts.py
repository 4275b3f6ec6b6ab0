"""GRPO's samples: prompt sources (the built-in arithmetic questions, a ``.jsonl`` of prompts and answers),
rollouts with their rewards, dynamic sampling's group selection, and held-out greedy accuracy."""

from __future__ import annotations

import json
import time
from typing import Optional, Sequence

import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.data.tasks.arithmetic import decode
from deepseek_jax.inference.generation import generate
from deepseek_jax.inference.sampling import SamplingParams
from deepseek_jax.posttrain.rewards import (
    RewardFn,
    arithmetic_prompts,
    arithmetic_stop_ids,
    exact_answer,
    score,
)


class ArithmeticPrompts:
    """The built-in task's questions: step ``s`` asks ``n`` fresh ones drawn from ``(seed, s + 1)`` (so a resumed
    run asks what the uninterrupted one would have); the reference answer is the exact result."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.step = n, seed, 0
        self.stop_ids = arithmetic_stop_ids()

    def __next__(self) -> tuple[list[list[int]], list[str]]:
        out = arithmetic_prompts(self.seed, self.n, stream=self.step + 1)
        self.step += 1
        return out

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> "ArithmeticPrompts":
        self.step = int(state["step"])
        return self


class JsonlPrompts:
    """``{"prompt": str, "answer": str}`` per line of a ``.jsonl`` file, encoded with ``tokenizer`` (a
    ``tokenizers.Tokenizer``; its post-processor adds BOS); ``n`` per step, in a seeded order reshuffled each
    pass over the file."""

    def __init__(self, path: str, tokenizer, n: int, seed: int = 0, stop_ids: Sequence[int] = ()):
        self.prompts, self.answers = [], []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    prompt, answer = str(rec["prompt"]), str(rec.get("answer", ""))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": ..., \"answer\": ...}} ({e})") from None
                self.prompts.append(tokenizer.encode(prompt).ids)
                self.answers.append(answer)
        if not self.prompts:
            raise ValueError(f"{path}: no prompts")
        self.n, self.seed, self.step = n, seed, 0
        self.stop_ids = list(stop_ids)

    def __next__(self):
        m = len(self.prompts)
        picks = []
        for j in range(self.step * self.n, (self.step + 1) * self.n):
            order = np.random.default_rng([self.seed, j // m]).permutation(m)
            picks.append(int(order[j % m]))
        self.step += 1
        return [self.prompts[i] for i in picks], [self.answers[i] for i in picks]

    state = ArithmeticPrompts.state
    restore = ArithmeticPrompts.restore


def _texts(ids_list, tokenizer) -> list[str]:
    if tokenizer is None:
        return [decode(ids) for ids in ids_list]
    return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in ids_list]


def rollout(config: ModelConfig, params, prompts: Sequence[Sequence[int]], answers: Sequence[str], *,
            group_size: int, max_new_tokens: int, temperature: float, seed: int, stop_ids: Sequence[int],
            reward_fn: RewardFn = exact_answer, tokenizer=None, speculative: bool = False, mesh=None,
            dtype: Optional[str] = None) -> dict:
    """``group_size`` samples of each prompt (consecutive rows), their completions (the stop token included)
    with each token's log-probability as the sampler drew it, rewards and exact-answer accuracy, and the
    sampling's throughput. ``dtype``: the decode's compute and cache dtype (None: ``generate``'s default)."""
    rows = [list(p) for p in prompts for _ in range(group_size)]
    row_answers = [a for a in answers for _ in range(group_size)]
    t0 = time.perf_counter()
    out = generate(config, params, rows, max_new_tokens=max_new_tokens,
                   sampling=SamplingParams(temperature=temperature), seed=seed, eos_token_id=list(stop_ids),
                   speculative=speculative, mesh=mesh, options=None if dtype is None else ModelOptions(dtype=dtype))
    wall = time.perf_counter() - t0
    prompt_texts, completion_texts = _texts(rows, tokenizer), _texts(out.tokens, tokenizer)
    rewards = score(reward_fn, prompt_texts, completion_texts, row_answers)
    correct = score(exact_answer, prompt_texts, completion_texts, row_answers)
    return {"prompts": rows, "completions": out.tokens, "logprobs": out.logprobs, "rewards": rewards,
            "correct": correct, "texts": completion_texts, "seconds": wall, "stats": out.stats}


def informative_groups(rewards, group_size: int) -> np.ndarray:
    """``[N / group_size]`` True for the groups (consecutive samples of one prompt) whose rewards are not all
    equal: the only groups with non-zero advantages."""
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    return r.max(-1) > r.min(-1)


def select_groups(rollouts: Sequence[dict], group_size: int, num_groups: int) -> dict:
    """Dynamic sampling's batch from the rollouts of several rounds (``rollout``'s dicts): the first ``num_groups``
    informative groups in the order drawn, then, if too few, the other groups in the order drawn. Adds
    ``informative`` (how many of the kept groups differ)."""
    keys = ("prompts", "completions", "logprobs", "rewards", "correct", "texts")
    rows = {k: [x for ro in rollouts for x in ro[k]] for k in keys}
    good = informative_groups(np.asarray(rows["rewards"]), group_size)
    order = np.concatenate([np.flatnonzero(good), np.flatnonzero(~good)])[:num_groups]
    if len(order) < num_groups:
        raise ValueError(f"{len(good)} groups drawn, the batch needs {num_groups}")
    pick = [g * group_size + j for g in order.tolist() for j in range(group_size)]
    out = {k: [rows[k][i] for i in pick] for k in keys}
    for k in ("rewards", "correct"):
        out[k] = np.asarray(out[k], np.float32)
    out["informative"] = int(good[order].sum())
    return out


def evaluate_accuracy(config: ModelConfig, params, prompts: Sequence[Sequence[int]], answers: Sequence[str], *,
                      max_new_tokens: int = 5, stop_ids: Optional[Sequence[int]] = None, tokenizer=None,
                      reward_fn: RewardFn = exact_answer, mesh=None, batch: int = 256) -> float:
    """The mean reward (exact-answer accuracy by default) of greedy answers to held-out ``prompts``."""
    stop_ids = arithmetic_stop_ids() if stop_ids is None else stop_ids
    total = 0.0
    for lo in range(0, len(prompts), batch):
        chunk = [list(p) for p in prompts[lo:lo + batch]]
        out = generate(config, params, chunk, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), mesh=mesh)
        total += float(score(reward_fn, _texts(chunk, tokenizer), _texts(out.tokens, tokenizer),
                             answers[lo:lo + batch]).sum())
    return total / max(len(prompts), 1)


def heldout_arithmetic(n: int = 256, seed: int = 12345):
    """Held-out arithmetic prompts and answers (stream 0 of another seed than any run's default)."""
    return arithmetic_prompts(seed, n, stream=0)
