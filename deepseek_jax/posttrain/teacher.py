"""Where a distillation run's teacher comes from: a checkpoint; its top-k log-probabilities precomputed to disk in
shards (for a teacher too large to sit beside the student); or its answers to prompts, as the data of
sequence-level distillation."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.data.corpus import Corpus
from deepseek_jax.data.packing import Dataset
from deepseek_jax.data.tasks.arithmetic import ARITHMETIC_VOCAB_SIZE, decode
from deepseek_jax.inference.generation import generate
from deepseek_jax.inference.sampling import SamplingParams
from deepseek_jax.models.transformer import Transformer, abstract_params
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from deepseek_jax.parallel.rules import batch_sharding, param_shardings
from deepseek_jax.posttrain.kl import teacher_topk
from deepseek_jax.posttrain.rewards import arithmetic_prompts, arithmetic_stop_ids
from deepseek_jax.training.trainer import BATCH_KEYS

TEACHER_KEYS = ("teacher_logp", "teacher_ids")
SHARD_META = "teacher_shards.json"


def load_teacher(path: str, mesh=None):
    """``(config, params)`` of any checkpoint ``load_pretrained`` reads (a train work directory included), in
    fp32, onto ``mesh``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher {path}: no such directory")
    return load_pretrained(path, dtype=jnp.float32, mesh=mesh)


def precompute_teacher(teacher_config: ModelConfig, teacher_params, dataset, steps: int, out_dir: str, *,
                       top_k: int, temperature: float = 1.0, mesh=None, batches_per_shard: int = 64,
                       teacher_name: str = "teacher", progress: bool = True,
                       options: Optional[ModelOptions] = None) -> str:
    """Run the teacher over the first ``steps`` batches of ``dataset`` (what a distillation run with the same
    data arguments reads) and write, per batch, its inputs and the teacher's top-k log-probabilities and ids at
    ``temperature`` to ``out_dir``: ``.npz`` shards of ``batches_per_shard`` batches and ``teacher_shards.json``.
    Everything is written into a temporary directory renamed to ``out_dir`` at the end, so an interrupted run
    leaves nothing that looks complete. The teacher is sharded over ``mesh`` (default: all devices on data) and
    runs with ``options`` (default fp32: ``DistillConfig.teacher_precision``'s default, as in the step)."""
    from tqdm import tqdm

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir}: already exists; precomputed teacher shards are never overwritten")
    if top_k < 1 or top_k > teacher_config.vocab_size:
        raise ValueError(f"top_k = {top_k}: expected 1..{teacher_config.vocab_size} (the teacher's vocab_size)")
    mesh = make_mesh(None) if mesh is None else mesh
    model = Transformer(teacher_config, ModelOptions() if options is None else options)
    params = jax.device_put(teacher_params, param_shardings(abstract_params(teacher_config, model.options), mesh))
    shard = batch_sharding(mesh)

    @jax.jit
    def topk(params, inputs, positions, segment_ids):
        logits = model.apply({"params": params}, inputs, positions, segment_ids)
        return teacher_topk(logits, top_k, temperature)

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
    resumable like ``data/packing.py``'s ``Dataset`` (its state is the index of the next batch)."""

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
    not the prompts): ``(documents, masks)`` for ``Corpus.from_documents``."""
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
    prompts, _ = arithmetic_prompts(seed, num_prompts)
    docs, masks = teacher_samples(teacher_config, teacher_params, prompts, max_new_tokens=5,
                                  stop_ids=arithmetic_stop_ids(), speculative=speculative, mesh=mesh)
    return Dataset(Corpus.from_documents(docs, masks), seq_len=seq_len, batch_size=batch_size, seed=seed,
                   vocab_size=ARITHMETIC_VOCAB_SIZE, decode=decode)
