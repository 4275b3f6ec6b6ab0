"""Distillation: a teacher (any loadable model, e.g. a trained tiny-v3 MoE) into a student (a smaller V3, or a
dense Qwen2 / Llama student) that shares its vocabulary.

Token level: the student matches the teacher's next-token distribution at temperature ``T`` by forward KL,
reverse KL or a mix of the two (``kl.distillation_kl``), over the full vocabulary or the teacher's top-k
ids plus one bucket for the rest (``kl.topk_kl``). The teacher runs in the student's jitted step (its
params sharded by the same rules), or its top-k log-probabilities are precomputed to disk in shards
(``teacher.precompute_teacher``) for a teacher too large to sit beside the student.
Sequence level: the teacher answers prompts with ``generate`` and the student is trained on its answers
(``teacher_samples``), the way R1's reasoning was distilled into the R1-Distill models.

Everything else is training's: ``Trainer`` (sharding, jit, donation, grad accumulation), the data pipeline, and
the run (``training/run.py``: Orbax checkpoints with resume, the progress bar, ``metrics.jsonl``); LoRA too: a
student started from a checkpoint can train adapters only, checkpointed without their base (``layers/lora.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.data.packing import make_dataset
from deepseek_jax.models.counts import batch_flops
from deepseek_jax.models.transformer import Transformer, abstract_params
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from deepseek_jax.parallel.rules import param_shardings, replicated
from deepseek_jax.posttrain.kl import (
    distillation_kl,
    kl_divergences,
    teacher_topk,
    topk_kl,
)
from deepseek_jax.posttrain.teacher import (
    TEACHER_KEYS,
    TeacherShards,
    arithmetic_teacher_dataset,
    load_teacher,
)
from deepseek_jax.training import losses
from deepseek_jax.training.config import PRECISIONS, TrainConfig
from deepseek_jax.training.run import (
    init_params,
    prepare_workdir,
    run_in_workdir,
    save_tokenizer,
    with_lora_base,
)
from deepseek_jax.training.trainer import BATCH_KEYS, Trainer


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation loss: ``kl_weight * T^2 ((1 - mix) KL(p||q) + mix KL(q||p)) + ce_weight * CE``."""

    mix: float = 0.0  # 0: forward KL(teacher || student); 1: reverse KL(student || teacher)
    temperature: float = 1.0
    top_k: int = 0  # 0: the full vocabulary; else the teacher's top-k ids and a bucket for the rest
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # next-token CE on the data's own targets (sequence level: the teacher's samples)
    # The teacher's compute precision (fp32 / bf16 / fp8), whatever the student's, in the step and precomputed
    teacher_precision: str = "fp32"

    def __post_init__(self):
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix = {self.mix}: expected in [0, 1] (0 forward KL, 1 reverse KL)")
        if self.temperature <= 0:
            raise ValueError(f"temperature = {self.temperature}: expected > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 = the full vocabulary)")
        if self.teacher_precision not in PRECISIONS:
            raise ValueError(f"teacher_precision = {self.teacher_precision!r}: expected one of {PRECISIONS}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError(f"kl_weight = {self.kl_weight}, ce_weight = {self.ce_weight}: expected >= 0, "
                             "not both 0")


def check_vocab(teacher: ModelConfig, student: ModelConfig, teacher_name: str = "teacher",
                student_name: str = "student") -> None:
    """Distillation compares distributions over the same ids: the two vocabularies must be the same size."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(f"vocabulary mismatch: the teacher {teacher_name} has vocab_size {teacher.vocab_size}, the "
                         f"student {student_name} has vocab_size {student.vocab_size}; distillation needs the same "
                         f"vocabulary (e.g. --set vocab_size={teacher.vocab_size} for a preset student)")


class DistillTrainer(Trainer):
    """A ``Trainer`` for the student whose objective is the distillation loss. ``teacher_config``: the teacher
    runs inside the jitted step (``run_step(state, batch, teacher_params)``); None: the batch carries the
    teacher's precomputed top-k (``teacher_logp``, ``teacher_ids``), or, with ``kl_weight`` 0, nothing
    (sequence-level distillation). Under LoRA (``tc.lora_rank``) the student trains its adapters only; the teacher
    never has any (it runs the plain model at its own precision)."""

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh, dc: DistillConfig,
                 teacher_config: Optional[ModelConfig] = None):
        if tc.lora_dropout or tc.fp8_base:  # what `train` has, untested here
            raise ValueError("distillation with LoRA takes neither lora_dropout nor fp8_base (an FP8-kept base) yet")
        super().__init__(config, tc, mesh)
        self.dc = dc
        self.teacher = None
        if teacher_config is not None and dc.kl_weight > 0:
            check_vocab(teacher_config, config)
            platform = mesh.devices.flat[0].platform
            options = dataclasses.replace(tc.model_options(dc.teacher_precision, lora=False), platform=platform)
            self.teacher = Transformer(teacher_config, options)
            boxed = abstract_params(teacher_config, self.teacher.options)
            self.teacher_shardings = param_shardings(boxed, mesh, self.rules)
        elif dc.kl_weight > 0:
            if not dc.top_k:
                raise ValueError("precomputed teacher logits are top-k (values and ids): set top_k > 0")
            self.batch_keys = BATCH_KEYS + TEACHER_KEYS
            self.batch_ndims = {k: 3 for k in TEACHER_KEYS}

    def step_flops(self, tokens: float, attended_keys: float, selected_keys: float = None) -> float:
        """The student's training FLOPs plus the in-step teacher's forward over the same tokens (a V3.2 teacher
        is counted as attending every visible key: the step's ``selected_keys`` are the student's)."""
        flops = super().step_flops(tokens, attended_keys, selected_keys)
        if self.teacher is not None:
            flops += batch_flops(self.teacher.config, tokens, attended_keys, train=False, mtp=False,
                                 selected_keys=attended_keys)
        return flops

    def put_teacher(self, params):
        return jax.device_put(params, self.teacher_shardings)

    def _teacher_targets(self, teacher_params, batch) -> dict:
        with nn.logical_axis_rules(self.rules):
            logits = self.teacher.apply({"params": teacher_params}, batch["inputs"], batch["positions"],
                                        batch["segment_ids"])
        logits = jax.lax.stop_gradient(logits)
        if self.dc.top_k:
            logp, ids = teacher_topk(logits, self.dc.top_k, self.dc.temperature)
            return {"teacher_logp": logp, "teacher_ids": ids}
        return {"teacher_logits": logits}

    def _objective(self, logits, batch, norm):
        dc = self.dc
        ce_sum, n = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
        tokens = jnp.maximum(norm["tokens"], 1.0)
        ce = ce_sum / tokens
        parts = {"loss": ce, "tokens": n}
        total = dc.ce_weight * ce
        if dc.kl_weight > 0:
            if "teacher_logits" in batch:
                fwd, rev = kl_divergences(logits, batch["teacher_logits"], dc.temperature)
            else:
                fwd, rev = topk_kl(logits, batch["teacher_logp"], batch["teacher_ids"], dc.temperature)
            kl_sum, _ = distillation_kl(fwd, rev, batch["loss_mask"], dc.mix, dc.temperature)
            kl = kl_sum / tokens
            mask = batch["loss_mask"].astype(jnp.float32)
            parts.update(kl=kl, forward_kl=(fwd * mask).sum() / tokens, reverse_kl=(rev * mask).sum() / tokens)
            total = total + dc.kl_weight * kl
        return total, parts

    def _distill_step(self, state, batch, teacher_params):
        return self._train_step(state, {**batch, **self._teacher_targets(teacher_params, batch)})

    def step_fn(self, state):
        if self.teacher is None:
            return super().step_fn(state)
        if self._step is None:
            shard = self.state_shardings(state)
            self._step = jax.jit(self._distill_step, in_shardings=(shard, self.batch_shardings(),
                                                                   self.teacher_shardings),
                                 out_shardings=(shard, replicated(self.mesh)), donate_argnums=(0,))
        return self._step

    def run_step(self, state, batch, teacher_params=None):
        with mesh_context(self.mesh, self.rules):
            if self.teacher is None:
                return self._run(self.step_fn(state), state, batch)
            return self._run(self.step_fn(state), state, batch, teacher_params)


def distill(config: ModelConfig, tc: TrainConfig, dc: DistillConfig, workdir: str, *, teacher: Optional[str] = None,
            teacher_model: Optional[tuple] = None, teacher_shards: Optional[str] = None,
            sequence_prompts: int = 0, data: Optional[str] = None, tokenizer=None,
            arithmetic_loss: str = "answers", mesh_spec: Optional[str] = None, save_every: int = 100, keep: int = 3,
            resume: bool = True, progress: bool = True, async_save: bool = True, stop_after: Optional[int] = None,
            student_name: str = "student", init_from: Optional[str] = None) -> list[dict]:
    """Distill into a student of architecture ``config`` trained in ``workdir`` (a train work directory:
    ``config.json``, ``train_config.json``, ``distill_config.json``, checkpoints, ``metrics.jsonl``, ``loss.png``;
    ``deepseek-jax generate --checkpoint WORKDIR`` and ``load_pretrained`` read it).

    The teacher: ``teacher`` (a checkpoint directory) or ``teacher_model=(config, params)``; or
    ``teacher_shards``, a ``precompute_teacher`` directory whose batches are the data (no teacher in memory).
    ``sequence_prompts > 0``: sequence-level distillation on the built-in task, the data being that many
    questions answered by the teacher (``arithmetic_teacher_dataset``); with ``dc.kl_weight > 0`` the token-level
    loss is added on them. Otherwise the data is ``data`` (default the built-in arithmetic data,
    ``arithmetic_loss`` tokens counted) as in ``training/run.py``'s ``fit``.

    ``init_from``: the student starts from this checkpoint's weights (``config`` must be its config, as in
    ``fit``) instead of a random init. With ``tc.lora_rank`` (which needs it) the student trains LoRA adapters on
    that base: the work directory's checkpoints hold the adapters only and ``train_config.json``'s ``lora_base``
    names the base, so ``load_pretrained(workdir)``, ``report_arithmetic`` and ``deepseek-jax export`` read the
    student merged.
    """
    tc = with_lora_base(tc, init_from)
    mesh = make_mesh(mesh_spec)
    teacher_config = teacher_params = None
    teacher_name = teacher or "the given teacher"
    if teacher_shards is not None:
        source = TeacherShards(teacher_shards)
        teacher_name = f"{source.meta['teacher']} (precomputed in {teacher_shards})"
        if source.vocab_size != config.vocab_size:
            raise ValueError(f"vocabulary mismatch: the teacher {teacher_name} has vocab_size {source.vocab_size}, "
                             f"the student {student_name} has vocab_size {config.vocab_size}")
        for key, want in (("top_k", dc.top_k), ("temperature", dc.temperature), ("batch_size", tc.batch_size),
                          ("seq_len", tc.seq_len)):
            if source.meta[key] != want:
                raise ValueError(f"{teacher_shards}: precomputed with {key} = {source.meta[key]}, this run has "
                                 f"{want}; they must agree")
        if len(source) < tc.steps:
            raise ValueError(f"{teacher_shards}: holds {len(source)} batches, the run needs {tc.steps} steps")
    else:
        if teacher_model is not None:
            teacher_config, teacher_params = teacher_model
        elif teacher is not None:
            teacher_config, teacher_params = load_teacher(teacher, mesh)
        else:
            raise ValueError("distill needs a teacher: a checkpoint directory, (config, params), or precomputed "
                             "shards")
        check_vocab(teacher_config, config, teacher_name, student_name)
    trainer = DistillTrainer(config, tc, mesh, dc, teacher_config if teacher_shards is None else None)
    if teacher_shards is not None:
        dataset = source
    elif sequence_prompts:
        dataset = arithmetic_teacher_dataset(teacher_config, teacher_params, num_prompts=sequence_prompts,
                                             seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed)
    else:
        dataset = make_dataset(data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                               tokenizer=tokenizer, arithmetic_loss=arithmetic_loss, rows=trainer.process_rows())
        if dataset.vocab_size > config.vocab_size:
            raise ValueError(f"the data's vocabulary has {dataset.vocab_size} ids but the student's vocab_size is "
                             f"{config.vocab_size}")
    teacher_on_device = trainer.put_teacher(teacher_params) if trainer.teacher is not None else None
    prepare_workdir(workdir, config, tc, distill_config={**dataclasses.asdict(dc), "teacher": teacher_name,
                                                         "sequence_prompts": sequence_prompts,
                                                         "init_from": init_from})
    save_tokenizer(workdir, tokenizer, arithmetic=data in (None, "arithmetic"), copy_from=init_from)

    def step_fn(state, step):
        batch = trainer.put_batch(next(dataset))
        state, metrics = trainer.run_step(state, batch, teacher_on_device)
        return state, metrics

    def postfix(m, first):
        out = {"ce": f"{m['loss']:.3f}"}
        if "kl" in m:
            out["kl"] = f"{m['kl']:.4f}"
        return out

    fresh = (lambda: trainer.state_from_params(init_params(init_from, trainer))) if init_from is not None \
        else trainer.init_state
    return run_in_workdir(workdir, trainer, dataset, fresh, step_fn, desc="distill", postfix=postfix,
                          save_every=save_every, keep=keep, resume=resume,
                          progress=progress, async_save=async_save, stop_after=stop_after)

