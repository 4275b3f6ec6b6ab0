"""GRPO (DeepSeekMath, DeepSeek-R1): reinforcement learning with rule-checked rewards and no value model.

Each step: ``G`` samples for each of ``prompts_per_step`` prompts with the batched, seeded ``generate`` (absorbed
decode over the latent cache, MTP speculation when the policy has an MTP module); a reward per sample from a
plain Python function of the decoded text (``rewards.py``; exact answers on the built-in arithmetic task by
default); group-normalized advantages; then ``iterations`` optimizer steps on the same samples with the clipped
ratio objective and the k3 KL to a frozen reference, over completion tokens only (``grpo_loss``), the
old policy's log-probabilities computed once by the training forward before the first update. With
``filter_groups`` (DAPO's dynamic sampling) the batch keeps only groups whose rewards differ, drawing more prompts
to fill it.

Sampler / trainer mismatch: the samples come from another path than the training forward (the absorbed decode,
MTP speculation, bf16 on accelerators), so the sampler's distribution ``mu`` is not exactly the old policy ``pi_old``
the objective assumes. ``generate`` keeps each token's log-probability as it was drawn; every step logs
``|log pi_old - log mu|`` over the completion tokens (mean and max), and with ``tis_cap`` the surrogate of each
token is weighted by the truncated importance weight ``min(pi_old / mu, tis_cap)`` (the "TIS" correction RL
frameworks adopted for vLLM-sampled rollouts; a constant, no gradient), which is 1 where the two agree.

The update is ``Trainer``'s step (sharding, jit, donation, grad accumulation, clipping, the MoE balancing) with
GRPO's objective; checkpoints, resume, the progress bar and ``metrics.jsonl`` are the shared run's
(``training/run.py``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.checkpoint.load import pretrained_config
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.layers.lora import without_adapters
from deepseek_jax.models.transformer import Transformer
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from deepseek_jax.parallel.rules import batch_sharding
from deepseek_jax.posttrain.lora import merged
from deepseek_jax.posttrain.rewards import RewardFn, exact_answer
from deepseek_jax.posttrain.rollouts import (
    ArithmeticPrompts,
    evaluate_accuracy,
    heldout_arithmetic,
    informative_groups,
    rollout,
    select_groups,
)
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.metrics import metrics_to_host
from deepseek_jax.training.run import (
    init_params,
    prepare_workdir,
    run_in_workdir,
    save_tokenizer,
    with_lora_base,
)
from deepseek_jax.training.trainer import BATCH_KEYS, Trainer

GRPO_KEYS = ("old_logp", "ref_logp", "advantages", "tis_weight")


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
    # Truncated importance weight min(pi_old / sampler, tis_cap) on each token's surrogate (None: off, weight 1)
    tis_cap: Optional[float] = 2.0
    # The rollouts' compute (and cache) dtype: None for generate's default (bf16 on GPU / TPU, fp32 on CPU)
    rollout_dtype: Optional[str] = None
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
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ValueError(f"tis_cap = {self.tis_cap}: expected >= 1 (or None: no importance weight)")
        if self.rollout_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"rollout_dtype = {self.rollout_dtype!r}: expected float32, bfloat16 or None")

    @property
    def batch_size(self) -> int:
        return self.group_size * self.prompts_per_step


# ----- the objective (DeepSeekMath / R1; docs/reference.md, section 7) -----------------------------
GRPO_STD_EPS = 1e-4  # added to the group's std: a group whose rewards are all equal gets zero advantages


def group_advantages(rewards: jax.Array, group_size: int, eps: float = GRPO_STD_EPS) -> jax.Array:
    """``A_i = (r_i - mean r) / (std r + eps)`` within each group of ``group_size`` consecutive samples (the
    samples of one prompt); std is the population std (ddof 0). ``rewards [N]`` -> ``[N]``."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    a = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True) + eps)
    return a.reshape(-1)


def tis_weights(old_logp: jax.Array, sampler_logp: jax.Array, cap: Optional[float]) -> jax.Array:
    """The truncated importance weight per token, ``min(pi_old / mu, cap)`` = ``min(exp(old - sampler), cap)``;
    ones when ``cap`` is None."""
    if cap is None:
        return jnp.ones_like(old_logp, jnp.float32)
    return jnp.minimum(jnp.exp(old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32)), cap)


def grpo_token_terms(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
                     clip_eps: float):
    """Per completion token ``[B, T]``: the clipped surrogate ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with
    ``rho = pi / pi_old``, the k3 estimate of ``KL(pi || pi_ref)``: ``pi_ref / pi - log(pi_ref / pi) - 1`` (>= 0,
    unbiased), and whether the clip was active. ``advantages [B]`` (one per sample)."""
    a = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * a, clipped * a)
    log_ref_ratio = ref_logp - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    return surrogate, kl, (ratio * a > clipped * a)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float, beta: float,
              token_level: bool = False, num_samples=None, num_tokens=None, tis_weight=None):
    """The GRPO loss, ``-objective``, with the objective
    ``mean_i 1/|o_i| sum_t [min(rho A, clip(rho) A) - beta KL]`` over the completion tokens (``mask [B, T]``) of
    each sample, then over the samples (equal groups: the mean of the group means), as docs/reference.md, section 7 and
    DeepSeekMath write it. ``token_level``: one mean over every completion token of the batch instead (DAPO's
    normalization: long completions weigh more). ``num_samples`` / ``num_tokens``: the global batch's counts
    (default this batch's), so micro-batch losses add up to the batch's. Returns ``(loss, metrics)``; metrics are
    the mean k3 KL and clipped fraction per completion token, summable over micro-batches like the loss.
    ``tis_weight [B, T]`` (``tis_weights``) scales each token's surrogate, not its KL term."""
    mask = mask.astype(jnp.float32)
    surrogate, kl, clipped = grpo_token_terms(logp, old_logp, ref_logp, advantages, clip_eps)
    if tis_weight is not None:
        surrogate = surrogate * jax.lax.stop_gradient(tis_weight)
    per_token = (surrogate - beta * kl) * mask
    tokens = mask.sum() if num_tokens is None else num_tokens
    if token_level:
        objective = per_token.sum() / jnp.maximum(tokens, 1.0)
    else:
        samples = (mask.sum(-1) > 0).sum() if num_samples is None else num_samples
        per_sample = per_token.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        objective = per_sample.sum() / jnp.maximum(samples, 1.0)
    n = jnp.maximum(tokens, 1.0)
    return -objective, {"kl": (kl * mask).sum() / n, "clip_fraction": (clipped * mask).sum() / n}


class GRPOTrainer(Trainer):
    """A ``Trainer`` whose objective is GRPO's; the batch carries, per sample row, the old policy's and the
    reference's log-probabilities of the target tokens and the sample's advantage. The MTP loss is off (the
    MTP modules are frozen: they only draft in the rollouts, where rejection sampling keeps the policy's
    distribution whatever they propose). Under LoRA (``tc.lora_rank``) the adapters alone train; the rollouts
    sample the adapted policy (``sampling_params``) and the reference is the frozen base (``reference_logp``)."""

    batch_keys = BATCH_KEYS + GRPO_KEYS
    batch_ndims = {"advantages": 1}

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh, gc: GRPOConfig):
        # Adapter dropout would make the training forward differ from the old policy's log-probs (computed without
        # it), and the sampler's merged weights have no FP8-kept form yet.
        if tc.lora_dropout or tc.fp8_base:
            raise ValueError("GRPO with LoRA takes neither lora_dropout nor fp8_base (an FP8-kept base) yet")
        if tc.batch_size != gc.batch_size:
            tc = dataclasses.replace(tc, batch_size=gc.batch_size)
        # ``iterations`` optimizer updates per GRPO step: the schedule spans all of them (warmup in GRPO steps).
        super().__init__(config, dataclasses.replace(tc, mtp_weight=0.0, z_loss_weight=0.0), mesh,
                         updates_per_step=gc.iterations)
        self.gc = gc
        shard = batch_sharding(mesh)
        self._logp = jax.jit(partial(self._token_logp, self.model),
                             in_shardings=(self.param_shardings, shard, shard, shard, shard), out_shardings=shard)
        self._base_logp = None
        if self.lora is not None:  # the reference: the frozen base, i.e. the plain model on the params' base
            base_model = Transformer(config, dataclasses.replace(self.model.options, lora=None))
            self._base_logp = jax.jit(partial(self._token_logp, base_model),
                                      in_shardings=(self.base_shardings(), shard, shard, shard, shard),
                                      out_shardings=shard)

    def _target_logp(self, logits, targets):
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / self.gc.temperature, axis=-1)
        return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def _token_logp(self, model, params, inputs, targets, positions, segment_ids):
        with nn.logical_axis_rules(self.rules):
            logits = model.apply({"params": params}, inputs, positions, segment_ids)
        return self._target_logp(logits, targets)

    def token_logp(self, params, batch: dict) -> jax.Array:
        """``[B, T]`` log-probabilities (at the sampling temperature) of ``batch``'s targets under ``params``
        (under LoRA: the adapted policy, base + adapters)."""
        with mesh_context(self.mesh, self.rules):
            return self._logp(params, batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"])

    def reference_logp(self, params, reference, batch: dict) -> jax.Array:
        """``token_logp`` under the frozen reference policy: ``reference``'s params; under LoRA (``reference``
        None) the base of ``params`` with the adapters off. The adapters start at B = 0, so the base is the
        starting policy, the reference of a full fine-tuning run, and no copy of the model is held for it."""
        if self.lora is None:
            return self.token_logp(reference, batch)
        with mesh_context(self.mesh, self.rules):
            return self._base_logp(without_adapters(params), batch["inputs"], batch["targets"], batch["positions"],
                                   batch["segment_ids"])

    def sampling_params(self, params):
        """The params ``generate`` runs for the rollouts and the held-out greedy evaluation: ``params``; under LoRA
        the adapted policy merged (``posttrain/lora.py``'s ``merged``). Merged, not a LoRA-aware sampler: the
        decode path (absorbed MLA over the latent cache, MTP drafts, the params placed by the inference rules) is
        the plain model's, and the merged kernels are the policy the training forward runs (to rounding: a merged
        kernel is stored in the base's dtype). The cost is memory: the targeted kernels once more, in the base's
        dtype, while a rollout runs (the untargeted leaves are shared, not copied; with the default targets, the
        attention projections and the routed experts, that is most of a MoE model); a full fine-tuning run holds a
        whole reference copy all the time, which LoRA does not (``reference_logp``). A LoRA-aware sampler would
        save that memory at the price of the adapters' two thin matmuls per targeted matmul in every decode step,
        and of the inference rules learning to place adapters."""
        return params if self.lora is None else merged(params, self.lora.scale)

    def update(self, state, samples: dict, reference) -> tuple[dict, list[dict]]:
        """``iterations`` optimizer steps on ``samples`` (``rollout``'s dict): the batch of ``samples_batch`` with
        the group advantages, the old policy's (``state``'s) and the reference's (``reference_logp``; None under
        LoRA) log-probabilities fixed before the first step, and (with the sampler's log-probabilities,
        ``samples["logprobs"]``) the truncated importance weights. Returns the state and each step's host metrics,
        the mismatch's included (``sampler_mismatch``)."""
        gc = self.gc
        host = samples_batch(samples["prompts"], samples["completions"], self.tc.seq_len, samples.get("logprobs"))
        host["advantages"] = np.asarray(group_advantages(jnp.asarray(samples["rewards"]), gc.group_size))
        sampler = host.pop("sampler_logp", None)
        zeros = np.zeros(host["targets"].shape, np.float32)  # filled on the devices below
        batch = self.put_batch({**host, "old_logp": zeros, "ref_logp": zeros, "tis_weight": zeros})
        batch["old_logp"] = self.token_logp(state["params"], batch)
        batch["ref_logp"] = (self.reference_logp(state["params"], reference, batch) if gc.beta
                             else jnp.zeros_like(batch["old_logp"]))
        mismatch = {}
        if sampler is None:
            batch["tis_weight"] = jnp.ones_like(batch["old_logp"])
        else:
            sampler = jax.device_put(sampler, batch["old_logp"].sharding)
            batch["tis_weight"] = tis_weights(batch["old_logp"], sampler, gc.tis_cap)
            mismatch = sampler_mismatch(batch["old_logp"], sampler, batch["tis_weight"], batch["loss_mask"],
                                        gc.tis_cap)
        updates = []
        for _ in range(gc.iterations):
            state, metrics = self.run_step(state, batch)
            updates.append({**metrics_to_host(metrics), **mismatch})
        return state, updates

    def _objective(self, logits, batch, norm):
        gc = self.gc
        logp = self._target_logp(logits, batch["targets"])
        loss, m = grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                            batch["loss_mask"], clip_eps=gc.clip_eps, beta=gc.beta,
                            token_level=gc.token_level, num_samples=norm["sequences"],
                            num_tokens=norm["tokens"], tis_weight=batch["tis_weight"])
        return loss, {"loss": loss, "tokens": batch["loss_mask"].astype(jnp.float32).sum(), **m}


def sampler_mismatch(old_logp, sampler_logp, weight, mask, cap: Optional[float]) -> dict:
    """Host metrics of how far the sampler's log-probabilities are from the training forward's, over the
    completion tokens: ``sampler_logp_diff_mean`` / ``_max`` (``|log pi_old - log mu|``), the mean importance
    weight and the fraction of tokens whose weight was truncated at ``cap``."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    diff = jnp.abs(old_logp - sampler_logp) * m
    ratio = jnp.exp(old_logp - sampler_logp)
    out = {"sampler_logp_diff_mean": diff.sum() / n, "sampler_logp_diff_max": diff.max(),
           "tis_weight_mean": (weight * m).sum() / n,
           "tis_truncated": ((ratio > cap) * m).sum() / n if cap is not None else jnp.zeros(())}
    return {k: float(v) for k, v in out.items()}


# ----- samples -> a batch ---------------------------------------------------------------------------------
def samples_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
                  logprobs: Optional[Sequence[Sequence[float]]] = None) -> dict:
    """Rows ``prompt + completion`` as a train batch: ``inputs``/``targets`` shifted by one, padded to ``seq_len``;
    ``loss_mask`` 1 exactly where the target is a completion token (the prompt and padding never count). With
    ``logprobs`` (the sampler's, one per completion token) also ``sampler_logp``, aligned with the targets."""
    b = len(prompts)
    batch = {"inputs": np.zeros((b, seq_len), np.int32), "targets": np.zeros((b, seq_len), np.int32),
             "positions": np.zeros((b, seq_len), np.int32), "segment_ids": np.zeros((b, seq_len), np.int32),
             "loss_mask": np.zeros((b, seq_len), np.float32)}
    if logprobs is not None:
        batch["sampler_logp"] = np.zeros((b, seq_len), np.float32)
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
        if logprobs is not None:
            if len(logprobs[i]) != len(c):
                raise ValueError(f"sample {i}: {len(logprobs[i])} log-probabilities for {len(c)} completion tokens")
            batch["sampler_logp"][i, len(p) - 1:n] = logprobs[i]
    return batch


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
    With ``tc.lora_rank`` (which needs ``init_from``) only LoRA adapters train: the rollouts sample the adapted
    policy (``GRPOTrainer.sampling_params``), the reference is the base itself (adapters off), and the
    checkpoints hold the adapters, ``train_config.json``'s ``lora_base`` naming the base.
    ``prompts``: an iterator of ``(prompt ids, answers)`` per step with ``state()`` / ``restore()`` and
    ``stop_ids`` (default ``ArithmeticPrompts``). ``seq_len``: of the training rows (default: 8 + max_new_tokens
    rounded up to a multiple of 8 for arithmetic). ``tc``: the optimizer (``batch_size`` is G x prompts).
    ``eval_set``: ``(prompts, answers)`` scored greedily every ``gc.eval_every`` steps
    (default ``heldout_arithmetic(gc.eval_prompts)``), logged as ``heldout_accuracy``.
    """
    if jax.process_count() > 1:
        raise NotImplementedError("GRPO runs in one process (its mesh may span that process's devices); "
                                  "multi-host rollouts are not implemented")
    tc = with_lora_base(tc, init_from)
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
    # The reference: the starting policy, in its own buffers (the train state is donated at every step); under
    # LoRA the state's own frozen base (GRPOTrainer.reference_logp), no copy.
    reference = None if trainer.lora is not None else jax.jit(
        lambda p: jax.tree.map(lambda x: x * 1, p), out_shardings=trainer.param_shardings)(params)
    speculative = config.num_nextn_predict_layers > 0 if gc.speculative is None else gc.speculative
    if eval_set is None and gc.eval_every and isinstance(prompts, ArithmeticPrompts):
        eval_set = heldout_arithmetic(gc.eval_prompts)

    prepare_workdir(workdir, config, trainer.tc, grpo_config={**dataclasses.asdict(gc), "init_from": init_from})
    save_tokenizer(workdir, tokenizer, arithmetic=isinstance(prompts, ArithmeticPrompts), copy_from=init_from)
    evaluated = []  # the first step of this call is evaluated too (a resumed run's starting point)
    start_params = [params]  # the fresh state's (a full run's reference is a copy); dropped once a step runs
    del params

    def sample(params, step, round_):
        ids, answers = next(prompts)
        return rollout(config, params, ids, answers, group_size=gc.group_size, max_new_tokens=gc.max_new_tokens,
                       temperature=gc.temperature, seed=tc.seed * 1_000_003 + step + 10_000_019 * round_,
                       stop_ids=prompts.stop_ids, reward_fn=reward_fn, tokenizer=tokenizer,
                       speculative=speculative, mesh=gen_mesh, dtype=gc.rollout_dtype)

    def draw(state, step):
        sampled = trainer.sampling_params(state["params"])  # under LoRA merged, freed once the rollouts are done
        return _draw(lambda r: sample(sampled, step, r), gc)

    def step_fn(state, step):
        start_params.clear()
        first, ro, rounds = draw(state, step)
        state, updates = trainer.update(state, ro, reference)
        m = _step_metrics(first, ro, rounds, updates, gc.group_size)
        if eval_set is not None and gc.eval_every and ((step + 1) % gc.eval_every == 0 or not evaluated):
            evaluated.append(step)
            m["heldout_accuracy"] = evaluate_accuracy(config, trainer.sampling_params(state["params"]), *eval_set,
                                                      max_new_tokens=gc.max_new_tokens, stop_ids=prompts.stop_ids,
                                                      tokenizer=tokenizer, mesh=gen_mesh)
        if on_step is not None:
            on_step({**m, "texts": first["texts"]})
        return state, m

    def postfix(m, first):
        return dict(reward=f"{m['reward']:.3f}", acc=f"{m['accuracy']:.3f}", kl=f"{m['kl']:.4f}",
                    len=f"{m['completion_length']:.1f}")

    def fresh():
        return trainer.state_from_params(start_params.pop())

    return run_in_workdir(workdir, trainer, prompts, fresh, step_fn, desc="grpo", postfix=postfix, mfu=False,
                          plot=plot_grpo_curves, save_every=save_every, keep=keep, resume=resume,
                          progress=progress, async_save=async_save, stop_after=stop_after)


def _draw(sample: Callable[[int], dict], gc: GRPOConfig) -> tuple[dict, dict, list[dict]]:
    """A step's samples: ``(first round, the batch's samples, every round)``. Without ``filter_groups`` one round
    of fresh prompts; with it (DAPO's dynamic sampling) rounds until ``prompts_per_step`` informative groups were
    drawn or ``max_sample_rounds`` rounds, the batch taken from them (``select_groups``)."""
    rounds = [sample(0)]
    first = rounds[0]  # fresh prompts: the reward and accuracy logged (comparable with or without filtering)
    if not gc.filter_groups:
        return first, first, rounds
    while (sum(int(informative_groups(r["rewards"], gc.group_size).sum()) for r in rounds)
           < gc.prompts_per_step and len(rounds) < gc.max_sample_rounds):
        rounds.append(sample(len(rounds)))
    ro = {**select_groups(rounds, gc.group_size, gc.prompts_per_step),
          "seconds": sum(r["seconds"] for r in rounds), "stats": first["stats"]}
    return first, ro, rounds


def _step_metrics(first: dict, ro: dict, rounds: list[dict], updates: list[dict], group_size: int) -> dict:
    """What a GRPO step logs: the fresh samples' reward and accuracy, the batch's groups, the sampling's
    throughput, and the update's metrics (loss, KL, clip fraction and gradient norm averaged over the iterations,
    the rest the last iteration's; the sampler mismatch is the batch's, one value per step)."""
    lengths = [len(c) for c in ro["completions"]]
    drawn = sum(len(r["completions"]) for r in rounds)
    m = {"reward": float(first["rewards"].mean()), "accuracy": float(first["correct"].mean()),
         "completion_length": float(np.mean(lengths)),
         "reward_std_in_group": float(ro["rewards"].reshape(-1, group_size).std(-1).mean()),
         "informative_groups": float(informative_groups(ro["rewards"], group_size).mean()),
         "informative_drawn": float(np.mean([informative_groups(r["rewards"], group_size) for r in rounds])),
         "sample_rounds": len(rounds),
         "rollout_samples_per_s": drawn / ro["seconds"], "rollout_s": ro["seconds"]}
    if "acceptance_rate" in ro["stats"]:  # MTP speculation only (a None would stop the loop's metrics_to_host)
        m["acceptance_rate"] = ro["stats"]["acceptance_rate"]
    m.update(updates[-1])
    for k in ("loss", "kl", "clip_fraction", "grad_norm"):
        m[k] = float(np.mean([u[k] for u in updates]))
    return m


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


