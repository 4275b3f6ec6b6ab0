"""Distillation: a teacher (any loadable model, e.g. a trained tiny-v3 MoE) into a student (a smaller V3, or a
dense Qwen2 / Llama student) that shares its vocabulary.

Token level: the student matches the teacher's next-token distribution at temperature ``T`` by forward KL,
reverse KL or a mix of the two (``losses.distillation_kl``), over the full vocabulary or the teacher's top-k
ids plus one bucket for the rest (``losses.topk_kl``). The teacher runs in the student's jitted step (its
params sharded by the same rules), or its top-k log-probabilities are precomputed to disk in shards
(``precompute_teacher``) for a teacher too large to sit beside the student.
Sequence level: the teacher answers prompts with ``generate`` and the student is trained on its answers
(``teacher_samples``), the way R1's reasoning was distilled into the R1-Distill models.

Everything else is ``train``'s: ``Trainer`` (sharding, jit, donation, grad accumulation), the data pipeline,
Orbax checkpoints with resume, the progress bar and ``metrics.jsonl`` (``train.run_loop``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import losses
from .config import ModelConfig
from .model import Transformer
from .sharding import mesh_context, param_shardings, replicated
from .train import BATCH_KEYS, TrainConfig, Trainer, metrics_to_host, run_loop, start_or_resume
from .train import write_json as _write_json

TEACHER_KEYS = ("teacher_logp", "teacher_ids")
SHARD_META = "teacher_shards.json"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation loss: ``kl_weight * T^2 ((1 - mix) KL(p||q) + mix KL(q||p)) + ce_weight * CE``."""

    mix: float = 0.0  # 0: forward KL(teacher || student); 1: reverse KL(student || teacher)
    temperature: float = 1.0
    top_k: int = 0  # 0: the full vocabulary; else the teacher's top-k ids and a bucket for the rest
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # next-token CE on the data's own targets (sequence level: the teacher's samples)

    def __post_init__(self):
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix = {self.mix}: expected in [0, 1] (0 forward KL, 1 reverse KL)")
        if self.temperature <= 0:
            raise ValueError(f"temperature = {self.temperature}: expected > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 = the full vocabulary)")
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
    (sequence-level distillation)."""

    def __init__(self, config: ModelConfig, tc: TrainConfig, mesh, dc: DistillConfig,
                 teacher_config: Optional[ModelConfig] = None):
        super().__init__(config, tc, mesh)
        self.dc = dc
        self.teacher = None
        if teacher_config is not None and dc.kl_weight > 0:
            check_vocab(teacher_config, config)
            platform = mesh.devices.flat[0].platform
            self.teacher = Transformer(teacher_config, dataclasses.replace(tc.model_options(), platform=platform))
            boxed = jax.eval_shape(self.teacher.init, jax.random.PRNGKey(0), self._dummy)["params"]
            self.teacher_shardings = param_shardings(boxed, mesh, self.rules)
        elif dc.kl_weight > 0:
            if not dc.top_k:
                raise ValueError("precomputed teacher logits are top-k (values and ids): set top_k > 0")
            self.batch_keys = BATCH_KEYS + TEACHER_KEYS
            self.batch_ndims = {k: 3 for k in TEACHER_KEYS}

    def put_teacher(self, params):
        return jax.device_put(params, self.teacher_shardings)

    def _teacher_targets(self, teacher_params, batch) -> dict:
        with nn.logical_axis_rules(self.rules):
            logits = self.teacher.apply({"params": teacher_params}, batch["inputs"], batch["positions"],
                                        batch["segment_ids"])
        logits = jax.lax.stop_gradient(logits)
        if self.dc.top_k:
            logp, ids = losses.teacher_topk(logits, self.dc.top_k, self.dc.temperature)
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
                fwd, rev = losses.kl_divergences(logits, batch["teacher_logits"], dc.temperature)
            else:
                fwd, rev = losses.topk_kl(logits, batch["teacher_logp"], batch["teacher_ids"], dc.temperature)
            kl_sum, _ = losses.distillation_kl(fwd, rev, batch["loss_mask"], dc.mix, dc.temperature)
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
                return self.step_fn(state)(state, batch)
            return self.step_fn(state)(state, batch, teacher_params)


# ----- the teacher's top-k on disk ----------------------------------------------------------------------
def precompute_teacher(teacher_config: ModelConfig, teacher_params, dataset, steps: int, out_dir: str, *,
                       top_k: int, temperature: float = 1.0, mesh=None, batches_per_shard: int = 64,
                       teacher_name: str = "teacher", progress: bool = True) -> str:
    """Run the teacher over the first ``steps`` batches of ``dataset`` (what a distillation run with the same
    data arguments reads) and write, per batch, its inputs and the teacher's top-k log-probabilities and ids at
    ``temperature`` to ``out_dir``: ``.npz`` shards of ``batches_per_shard`` batches and ``teacher_shards.json``.
    Everything is written into a temporary directory renamed to ``out_dir`` at the end, so an interrupted run
    leaves nothing that looks complete. The teacher is sharded over ``mesh`` (default: all devices on data)."""
    from tqdm import tqdm

    from .sharding import batch_sharding, make_mesh

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir}: already exists; precomputed teacher shards are never overwritten")
    if top_k < 1 or top_k > teacher_config.vocab_size:
        raise ValueError(f"top_k = {top_k}: expected 1..{teacher_config.vocab_size} (the teacher's vocab_size)")
    mesh = make_mesh(None) if mesh is None else mesh
    model = Transformer(teacher_config)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    params = jax.device_put(teacher_params, param_shardings(boxed, mesh))
    shard = batch_sharding(mesh)

    @jax.jit
    def topk(params, inputs, positions, segment_ids):
        logits = model.apply({"params": params}, inputs, positions, segment_ids)
        return losses.teacher_topk(logits, top_k, temperature)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        pending: list[dict] = []
        n_shards = 0

        def flush():
            nonlocal pending, n_shards
            if pending:
                arrays = {k: np.stack([b[k] for b in pending]) for k in BATCH_KEYS + TEACHER_KEYS}
                np.savez(os.path.join(tmp, f"shard_{n_shards:05d}.npz"), **arrays)
                n_shards, pending = n_shards + 1, []

        for _ in tqdm(range(steps), desc="teacher top-k", disable=not progress, dynamic_ncols=True):
            b = next(dataset)
            with mesh_context(mesh):
                logp, ids = topk(params, *(jax.device_put(b[k], shard) for k in ("inputs", "positions",
                                                                                   "segment_ids")))
            pending.append({**b, "teacher_logp": np.asarray(logp, np.float32),
                            "teacher_ids": np.asarray(ids, np.int32)})
            if len(pending) == batches_per_shard:
                flush()
        flush()
        meta = {"batches": steps, "batches_per_shard": batches_per_shard, "shards": n_shards, "top_k": top_k,
                "temperature": temperature, "vocab_size": teacher_config.vocab_size, "teacher": teacher_name,
                "batch_size": dataset.batch_size, "seq_len": dataset.seq_len, "data_seed": dataset.seed}
        with open(os.path.join(tmp, SHARD_META), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class TeacherShards:
    """Batches (the data and the teacher's top-k) read back from ``precompute_teacher``'s directory, in order,
    resumable like ``data.Dataset`` (its state is the index of the next batch)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, SHARD_META)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no {SHARD_META}; not a directory written by "
                                    "`deepseek-jax distill --precompute-teacher`")
        with open(path) as f:
            self.meta = json.load(f)
        self.directory = directory
        self.files = sorted(glob.glob(os.path.join(directory, "shard_*.npz")))
        if len(self.files) != self.meta["shards"]:
            raise FileNotFoundError(f"{directory}: {len(self.files)} shard files, {SHARD_META} lists "
                                    f"{self.meta['shards']}")
        self.batch_size, self.seq_len = self.meta["batch_size"], self.meta["seq_len"]
        self.vocab_size = self.meta["vocab_size"]
        self._next = 0
        self._cache: tuple[int, dict] = (-1, {})

    def __len__(self) -> int:
        return self.meta["batches"]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._next >= len(self):
            raise StopIteration
        per = self.meta["batches_per_shard"]
        j, i = divmod(self._next, per)
        if self._cache[0] != j:
            with np.load(self.files[j]) as z:
                self._cache = (j, {k: z[k] for k in z.files})
        self._next += 1
        return {k: v[i] for k, v in self._cache[1].items()}

    def state(self) -> dict:
        return {"batch": self._next, "batches": len(self)}

    def restore(self, state: dict) -> "TeacherShards":
        self._next = int(state["batch"])
        return self


# ----- sequence level: the teacher's answers as data ------------------------------------------------------
def teacher_samples(teacher_config: ModelConfig, teacher_params, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, stop_ids: Sequence[int], temperature: float = 0.0, seed: int = 0,
                    batch: int = 256, speculative: bool = False, mesh=None):
    """The teacher's completions of ``prompts`` (token ids) by ``generate`` (greedy by default), as documents
    ``prompt + completion`` with a mask that is True on the completion only (the student learns the answers,
    not the prompts): ``(documents, masks)`` for ``data.Corpus.from_documents``."""
    from .generation import generate
    from .sampling import SamplingParams

    docs, masks = [], []
    for lo in range(0, len(prompts), batch):
        chunk = [list(p) for p in prompts[lo:lo + batch]]
        out = generate(teacher_config, teacher_params, chunk, max_new_tokens=max_new_tokens,
                       sampling=SamplingParams(temperature=temperature), seed=seed + lo,
                       eos_token_id=list(stop_ids), speculative=speculative, mesh=mesh)
        for p, completion in zip(chunk, out.tokens):
            docs.append(p + list(completion))
            masks.append([False] * len(p) + [True] * len(completion))
    return docs, masks


def arithmetic_teacher_dataset(teacher_config, teacher_params, *, num_prompts: int, seq_len: int,
                               batch_size: int, seed: int, speculative: bool = False, mesh=None):
    """Sequence-level distillation data on the built-in task: ``num_prompts`` arithmetic questions (from
    ``seed``) answered greedily by the teacher, packed into rows like any corpus, the loss on the answers."""
    from .data import ARITHMETIC_VOCAB_SIZE, Corpus, Dataset, decode
    from .rewards import arithmetic_prompts, arithmetic_stop_ids

    prompts, _ = arithmetic_prompts(seed, num_prompts)
    docs, masks = teacher_samples(teacher_config, teacher_params, prompts, max_new_tokens=5,
                                  stop_ids=arithmetic_stop_ids(), speculative=speculative, mesh=mesh)
    return Dataset(Corpus.from_documents(docs, masks), seq_len=seq_len, batch_size=batch_size, seed=seed,
                   vocab_size=ARITHMETIC_VOCAB_SIZE, decode=decode)


# ----- the run --------------------------------------------------------------------------------------------
def load_teacher(path: str, mesh=None):
    """``(config, params)`` of any checkpoint ``load_pretrained`` reads (a train work directory included)."""
    from .checkpoint import load_pretrained
    from .train import is_train_workdir, load_train_checkpoint

    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher {path}: no such directory")
    if is_train_workdir(path):  # read on one device; the trainer places it on the mesh
        return load_train_checkpoint(path)
    return load_pretrained(path, dtype=jnp.float32, mesh=mesh)


def distill(config: ModelConfig, tc: TrainConfig, dc: DistillConfig, workdir: str, *, teacher: Optional[str] = None,
            teacher_model: Optional[tuple] = None, teacher_shards: Optional[str] = None,
            sequence_prompts: int = 0, data: Optional[str] = None, tokenizer=None,
            arithmetic_loss: str = "answers", mesh_spec: Optional[str] = None, save_every: int = 100, keep: int = 3,
            resume: bool = True, progress: bool = True, async_save: bool = True, stop_after: Optional[int] = None,
            student_name: str = "student") -> list[dict]:
    """Distill into a student of architecture ``config`` trained in ``workdir`` (a train work directory:
    ``config.json``, ``train_config.json``, ``distill_config.json``, checkpoints, ``metrics.jsonl``, ``loss.png``;
    ``deepseek-jax generate --checkpoint WORKDIR`` and ``load_pretrained`` read it).

    The teacher: ``teacher`` (a checkpoint directory) or ``teacher_model=(config, params)``; or
    ``teacher_shards``, a ``precompute_teacher`` directory whose batches are the data (no teacher in memory).
    ``sequence_prompts > 0``: sequence-level distillation on the built-in task, the data being that many
    questions answered by the teacher (``arithmetic_teacher_dataset``); with ``dc.kl_weight > 0`` the token-level
    loss is added on them. Otherwise the data is ``data`` (default the built-in arithmetic data,
    ``arithmetic_loss`` tokens counted) as in ``train.fit``.
    """
    from .data import arithmetic_tokenizer, make_dataset
    from .sharding import make_mesh

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
                               tokenizer=tokenizer, arithmetic_loss=arithmetic_loss)
        if dataset.vocab_size > config.vocab_size:
            raise ValueError(f"the data's vocabulary has {dataset.vocab_size} ids but the student's vocab_size is "
                             f"{config.vocab_size}")
    teacher_on_device = trainer.put_teacher(teacher_params) if trainer.teacher is not None else None

    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config.to_hf_dict())
    _write_json(os.path.join(workdir, "train_config.json"), dataclasses.asdict(tc))
    _write_json(os.path.join(workdir, "distill_config.json"),
                {**dataclasses.asdict(dc), "teacher": teacher_name, "sequence_prompts": sequence_prompts})
    if jax.process_index() == 0:
        if tokenizer is not None:
            tokenizer.save(os.path.join(workdir, "tokenizer.json"))
        elif data in (None, "arithmetic"):
            arithmetic_tokenizer().save(os.path.join(workdir, "tokenizer.json"))
    ckpt, start, state = start_or_resume(workdir, trainer, dataset, trainer.init_state, resume=resume,
                                         save_every=save_every, keep=keep, async_save=async_save)

    def step_fn(state, step):
        batch = trainer.put_batch(next(dataset))
        state, metrics = trainer.run_step(state, batch, teacher_on_device)
        return state, metrics_to_host(metrics)

    def postfix(m, first):
        out = {"ce": f"{m['loss']:.3f}"}
        if "kl" in m:
            out["kl"] = f"{m['kl']:.4f}"
        return out

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    return run_loop(workdir, ckpt, state, start, end, tc.steps, step_fn, dataset.state, seed=tc.seed,
                    max_bad_steps=tc.max_bad_steps, progress=progress, desc="distill", postfix=postfix,
                    flops=trainer.flops_per_token())

