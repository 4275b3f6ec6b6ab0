"""GRPO (DeepSeekMath, DeepSeek-R1): reinforcement learning with rule-checked rewards and no value model.

Each step: ``G`` samples for each of ``prompts_per_step`` prompts with the batched, seeded ``generate`` (absorbed
decode over the latent cache, MTP speculation when the policy has an MTP module); a reward per sample from a
plain Python function of the decoded text (``rewards.py``; exact answers on the built-in arithmetic task by
default); group-normalized advantages; then ``iterations`` optimizer steps on the same samples with the clipped
ratio objective and the k3 KL to a frozen reference, over completion tokens only (``losses.grpo_loss``), the
old policy's log-probabilities fixed when the samples were drawn. With ``filter_groups`` (DAPO's dynamic sampling)
the batch keeps only groups whose rewards differ, drawing more prompts to fill it.

The update is ``Trainer``'s step (sharding, jit, donation, grad accumulation, clipping, the MoE balancing) with
GRPO's objective; checkpoints, resume, the progress bar and ``metrics.jsonl`` are ``train.run_loop``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .config import ModelConfig
from .rewards import RewardFn, arithmetic_prompts, arithmetic_stop_ids, exact_answer, score
from .sharding import batch_sharding, mesh_context
from .train import (BATCH_KEYS, TrainConfig, Trainer, init_params, metrics_to_host, run_loop,
                    start_or_resume)
from .train import write_json as _write_json

GRPO_KEYS = ("old_logp", "ref_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Sampling and objective of a GRPO run (the optimizer's settings are the ``TrainConfig``'s)."""

    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 16
    max_new_tokens: int = 5  # an arithmetic answer: up to 3 digits, newline (and one to spare)
    temperature: float = 1.0  # of the sampling, and of the log-probabilities in the ratio and the KL
    clip_eps: float = 0.2
    beta: float = 0.04  # weight of the k3 KL to the reference (DeepSeekMath: 0.04)
    iterations: int = 2  # optimizer steps per batch of samples (mu)
    token_level: bool = False  # normalize over all completion tokens of the batch (not per sample, then mean)
    speculative: Optional[bool] = None  # MTP speculation in the rollouts; None: when the policy has MTP
    eval_every: int = 0  # held-out greedy accuracy every this many steps (0: only at the end, by the caller)
    eval_prompts: int = 256
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (their advantages are 0, they teach only
    # the KL) and draw more prompts, ``prompts_per_step`` at a time, until the batch holds ``prompts_per_step``
    # groups that differ, or ``max_sample_rounds`` rounds were drawn (the batch is then topped up with equal
    # groups, in the order drawn). The batch's shape never changes, so nothing recompiles.
    filter_groups: bool = False
    max_sample_rounds: int = 4

    def __post_init__(self):
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "iterations", "max_sample_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: expected >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size = {self.group_size}: GRPO's advantages need at least 2 samples per prompt")
        if self.temperature <= 0:
            raise ValueError(f"temperature = {self.temperature}: GRPO samples; expected > 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps = {self.clip_eps}: expected in (0, 1)")
        if self.beta < 0:
            raise ValueError(f"beta = {self.beta}: expected >= 0")

    @property
    def batch_size(self) -> int:
        return self.group_size * self.prompts_per_step


class GRPOTrainer(Trainer):
    """A ``Trainer`` whose objective is GRPO's; the batch carries, per sample row, the old policy's and the
    reference's log-probabilities of the target tokens and the sample's advantage. The MTP loss is off (the
    MTP modules are frozen: they only draft in the rollouts, where rejection sampling keeps the policy's
    distribution whatever they propose)."""

    batch_keys = BATCH_KEYS + GRPO_KEYS
    batch_ndims = {"advantages": 1}

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh, gc: GRPOConfig):
        if tc.batch_size != gc.batch_size:
            tc = dataclasses.replace(tc, batch_size=gc.batch_size)
        super().__init__(config, dataclasses.replace(tc, mtp_weight=0.0, z_loss_weight=0.0), mesh)
        self.gc = gc
        shard = batch_sharding(mesh)
        self._logp = jax.jit(self._token_logp, in_shardings=(self.param_shardings, shard, shard, shard, shard),
                             out_shardings=shard)

    def _target_logp(self, logits, targets):
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / self.gc.temperature, axis=-1)
        return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def _token_logp(self, params, inputs, targets, positions, segment_ids):
        with nn.logical_axis_rules(self.rules):
            logits = self.model.apply({"params": params}, inputs, positions, segment_ids)
        return self._target_logp(logits, targets)

    def token_logp(self, params, batch: dict) -> jax.Array:
        """``[B, T]`` log-probabilities (at the sampling temperature) of ``batch``'s targets under ``params``."""
        with mesh_context(self.mesh, self.rules):
            return self._logp(params, batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"])

    def _objective(self, logits, batch, norm):
        gc = self.gc
        logp = self._target_logp(logits, batch["targets"])
        loss, m = losses.grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                                   batch["loss_mask"], clip_eps=gc.clip_eps, beta=gc.beta,
                                   token_level=gc.token_level, num_samples=norm["sequences"],
                                   num_tokens=norm["tokens"])
        return loss, {"loss": loss, "tokens": batch["loss_mask"].astype(jnp.float32).sum(), **m}


# ----- samples -> a batch ---------------------------------------------------------------------------------
def samples_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int) -> dict:
    """Rows ``prompt + completion`` as a train batch: ``inputs``/``targets`` shifted by one, padded to ``seq_len``;
    ``loss_mask`` 1 exactly where the target is a completion token (the prompt and padding never count)."""
    b = len(prompts)
    batch = {"inputs": np.zeros((b, seq_len), np.int32), "targets": np.zeros((b, seq_len), np.int32),
             "positions": np.zeros((b, seq_len), np.int32), "segment_ids": np.zeros((b, seq_len), np.int32),
             "loss_mask": np.zeros((b, seq_len), np.float32)}
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        n = len(seq) - 1
        if n > seq_len:
            raise ValueError(f"sample {i}: prompt ({len(p)} tokens) + completion ({len(c)}) needs seq_len >= {n}, "
                             f"this run has {seq_len}")
        batch["inputs"][i, :n] = seq[:-1]
        batch["targets"][i, :n] = seq[1:]
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, len(p) - 1:n] = 1.0
    return batch


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


# ----- rollouts and evaluation ------------------------------------------------------------------------------
def _texts(ids_list, tokenizer) -> list[str]:
    if tokenizer is None:
        from .data import decode

        return [decode(ids) for ids in ids_list]
    return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in ids_list]


def rollout(config: ModelConfig, params, prompts: Sequence[Sequence[int]], answers: Sequence[str], *,
            group_size: int, max_new_tokens: int, temperature: float, seed: int, stop_ids: Sequence[int],
            reward_fn: RewardFn = exact_answer, tokenizer=None, speculative: bool = False, mesh=None) -> dict:
    """``group_size`` samples of each prompt (consecutive rows), their completions (the stop token included),
    rewards and exact-answer accuracy, and the sampling's throughput."""
    from .generation import generate
    from .sampling import SamplingParams

    rows = [list(p) for p in prompts for _ in range(group_size)]
    row_answers = [a for a in answers for _ in range(group_size)]
    t0 = time.perf_counter()
    out = generate(config, params, rows, max_new_tokens=max_new_tokens,
                   sampling=SamplingParams(temperature=temperature), seed=seed, eos_token_id=list(stop_ids), speculative=speculative, mesh=mesh)
    wall = time.perf_counter() - t0
    prompt_texts, completion_texts = _texts(rows, tokenizer), _texts(out.tokens, tokenizer)
    rewards = score(reward_fn, prompt_texts, completion_texts, row_answers)
    correct = score(exact_answer, prompt_texts, completion_texts, row_answers)
    return {"prompts": rows, "completions": out.tokens, "rewards": rewards, "correct": correct,
            "texts": completion_texts, "seconds": wall, "stats": out.stats}


def informative_groups(rewards, group_size: int) -> np.ndarray:
    """``[N / group_size]`` True for the groups (consecutive samples of one prompt) whose rewards are not all
    equal: the only groups with non-zero advantages."""
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    return r.max(-1) > r.min(-1)


def select_groups(rollouts: Sequence[dict], group_size: int, num_groups: int) -> dict:
    """Dynamic sampling's batch from the rollouts of several rounds (``rollout``'s dicts): the first ``num_groups``
    informative groups in the order drawn, then, if too few, the other groups in the order drawn. Adds
    ``informative`` (how many of the kept groups differ)."""
    keys = ("prompts", "completions", "rewards", "correct", "texts")
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
    from .generation import generate

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


# ----- the run ------------------------------------------------------------------------------------------------
def grpo(gc: GRPOConfig, tc: TrainConfig, workdir: str, *, init_from: Optional[str] = None,
         policy: Optional[tuple] = None, config: Optional[ModelConfig] = None, reward_fn: RewardFn = exact_answer,
         prompts=None, tokenizer=None, seq_len: Optional[int] = None, mesh_spec: Optional[str] = None,
         save_every: int = 50, keep: int = 3, resume: bool = True, progress: bool = True, async_save: bool = True,
         stop_after: Optional[int] = None, eval_set: Optional[tuple] = None,
         on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train a policy by GRPO in ``workdir`` (a train work directory: ``config.json``, ``train_config.json``,
    ``grpo_config.json``, checkpoints, ``metrics.jsonl``, ``loss.png`` with reward and accuracy curves).

    The policy: ``init_from`` (a checkpoint directory: a train work directory, HF or converted), or
    ``policy=(config, params)``, or a random ``config``; the frozen reference is the starting policy.
    ``prompts``: an iterator of ``(prompt ids, answers)`` per step with ``state()`` / ``restore()`` and
    ``stop_ids`` (default ``ArithmeticPrompts``). ``seq_len``: of the training rows (default: 8 + max_new_tokens
    rounded up to a multiple of 8 for arithmetic). ``tc``: the optimizer (``batch_size`` is G x prompts).
    ``eval_set``: ``(prompts, answers)`` scored greedily every ``gc.eval_every`` steps
    (default ``heldout_arithmetic(gc.eval_prompts)``), logged as ``heldout_accuracy``.
    """
    from .checkpoint import pretrained_config
    from .sharding import make_mesh

    if jax.process_count() > 1:
        raise NotImplementedError("GRPO runs in one process (its mesh may span that process's devices); "
                                  "multi-host rollouts are not implemented")
    mesh = make_mesh(mesh_spec)
    gen_mesh = mesh if mesh.size > 1 else None  # one device: generate skips re-placing the params
    if init_from is not None:
        config = pretrained_config(init_from)
    elif policy is not None:
        config = policy[0]
    elif config is None:
        raise ValueError("grpo needs a policy: init_from, policy=(config, params) or a config")
    prompts = ArithmeticPrompts(gc.prompts_per_step, tc.seed) if prompts is None else prompts
    if seq_len is None:
        seq_len = -(-(8 + gc.max_new_tokens) // 8) * 8
    tc = dataclasses.replace(tc, batch_size=gc.batch_size, seq_len=seq_len)
    trainer = GRPOTrainer(config, tc, mesh, gc)
    if init_from is not None:
        params = init_params(init_from, trainer)
    elif policy is not None:
        params = jax.device_put(policy[1], trainer.param_shardings)
    else:
        params = trainer.init_state()["params"]
    # The reference: the starting policy, in its own buffers (the train state is donated at every step).
    reference = jax.jit(lambda p: jax.tree.map(lambda x: x * 1, p), out_shardings=trainer.param_shardings)(params)
    speculative = config.num_nextn_predict_layers > 0 if gc.speculative is None else gc.speculative
    if eval_set is None and gc.eval_every and isinstance(prompts, ArithmeticPrompts):
        eval_set = heldout_arithmetic(gc.eval_prompts)

    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config.to_hf_dict())
    _write_json(os.path.join(workdir, "train_config.json"), dataclasses.asdict(trainer.tc))
    _write_json(os.path.join(workdir, "grpo_config.json"), {**dataclasses.asdict(gc), "init_from": init_from})
    _save_tokenizer(workdir, tokenizer, init_from, isinstance(prompts, ArithmeticPrompts))
    ckpt, start, state = start_or_resume(workdir, trainer, prompts, lambda: trainer.state_from_params(params),
                                         resume=resume, save_every=save_every, keep=keep, async_save=async_save)
    del params

    def sample(params, step, round_):
        ids, answers = next(prompts)
        return rollout(config, params, ids, answers, group_size=gc.group_size, max_new_tokens=gc.max_new_tokens,
                       temperature=gc.temperature, seed=tc.seed * 1_000_003 + step + 10_000_019 * round_,
                       stop_ids=prompts.stop_ids, reward_fn=reward_fn, tokenizer=tokenizer,
                       speculative=speculative, mesh=gen_mesh)

    def step_fn(state, step):
        rounds = [sample(state["params"], step, 0)]
        first = rounds[0]  # fresh prompts: the reward and accuracy logged (comparable with or without filtering)
        if gc.filter_groups:
            while (sum(int(informative_groups(r["rewards"], gc.group_size).sum()) for r in rounds)
                   < gc.prompts_per_step and len(rounds) < gc.max_sample_rounds):
                rounds.append(sample(state["params"], step, len(rounds)))
            ro = {**select_groups(rounds, gc.group_size, gc.prompts_per_step),
                  "seconds": sum(r["seconds"] for r in rounds), "stats": first["stats"]}
        else:
            ro = first
        host = samples_batch(ro["prompts"], ro["completions"], seq_len)
        host["advantages"] = np.asarray(losses.group_advantages(jnp.asarray(ro["rewards"]), gc.group_size))
        zeros = np.zeros(host["targets"].shape, np.float32)  # filled on the devices below
        batch = trainer.put_batch({**host, "old_logp": zeros, "ref_logp": zeros})
        batch["old_logp"] = trainer.token_logp(state["params"], batch)
        batch["ref_logp"] = trainer.token_logp(reference, batch) if gc.beta else jnp.zeros_like(batch["old_logp"])
        updates = []
        for _ in range(gc.iterations):
            state, metrics = trainer.run_step(state, batch)
            updates.append(metrics_to_host(metrics))
        lengths = [len(c) for c in ro["completions"]]
        drawn = sum(len(r["completions"]) for r in rounds)
        m = {"reward": float(first["rewards"].mean()), "accuracy": float(first["correct"].mean()),
             "completion_length": float(np.mean(lengths)),
             "reward_std_in_group": float(ro["rewards"].reshape(-1, gc.group_size).std(-1).mean()),
             "informative_groups": float(informative_groups(ro["rewards"], gc.group_size).mean()),
             "informative_drawn": float(np.mean([informative_groups(r["rewards"], gc.group_size) for r in rounds])),
             "sample_rounds": len(rounds),
             "rollout_samples_per_s": drawn / ro["seconds"], "rollout_s": ro["seconds"],
             "acceptance_rate": ro["stats"].get("acceptance_rate")}
        # The update's metrics: loss, KL and clip fraction averaged over the iterations, the rest the last's.
        m.update(updates[-1])
        for k in ("loss", "kl", "clip_fraction", "grad_norm"):
            m[k] = float(np.mean([u[k] for u in updates]))
        if eval_set is not None and gc.eval_every and ((step + 1) % gc.eval_every == 0 or step == start):
            m["heldout_accuracy"] = evaluate_accuracy(config, state["params"], *eval_set,
                                                      max_new_tokens=gc.max_new_tokens, stop_ids=prompts.stop_ids,
                                                      tokenizer=tokenizer, mesh=gen_mesh)
        if on_step is not None:
            on_step({**m, "texts": first["texts"]})
        return state, m

    def postfix(m, first):
        return dict(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.3f}", kl=f"{m['kl']:.4f}",
                    len=f"{m['completion_length']:.1f}")

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    return run_loop(workdir, ckpt, state, start, end, tc.steps, step_fn, prompts.state, seed=tc.seed,
                    max_bad_steps=tc.max_bad_steps, progress=progress, desc="grpo", postfix=postfix,
                    plot=plot_grpo_curves)


def plot_grpo_curves(rows: list[dict], path: str) -> None:
    """Reward, sampled accuracy, held-out greedy accuracy and KL per step."""
    if not rows:
        return
    # A bare Figure (no pyplot): drawing to a file leaves the caller's backend alone (a notebook's inline one).
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(10, 3.6))
    ax, ax2 = fig.subplots(1, 2)
    ax.plot(steps, [r["reward"] for r in rows], label="reward (samples)", alpha=0.7)
    ax.plot(steps, [r["accuracy"] for r in rows], label="accuracy (samples)", alpha=0.7)
    held = [(r["step"], r["heldout_accuracy"]) for r in rows if r.get("heldout_accuracy") is not None]
    if held:
        ax.plot(*zip(*held), "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot(steps, [r["kl"] for r in rows], color="C3")
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("k3 KL to the reference")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _save_tokenizer(workdir: str, tokenizer, init_from: Optional[str], arithmetic: bool) -> None:
    if jax.process_index() != 0:
        return
    target = os.path.join(workdir, "tokenizer.json")
    if tokenizer is not None:
        tokenizer.save(target)
    elif init_from is not None and os.path.isfile(os.path.join(init_from, "tokenizer.json")):
        shutil.copy2(os.path.join(init_from, "tokenizer.json"), target)
    elif arithmetic:
        from .data import arithmetic_tokenizer

        arithmetic_tokenizer().save(target)

