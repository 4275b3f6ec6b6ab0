"""Runs: the setup ``fit``, ``distill`` and ``grpo`` share, and ``fit``, the run of ``deepseek-jax train``.

A run lives in a work directory: ``config.json`` and ``train_config.json`` (plus the run kind's own record, e.g.
``grpo_config.json``), the tokenizer prompts are encoded with, ``checkpoints/``, ``metrics.jsonl``, ``tb/`` and the
curve. ``prepare_workdir`` writes the records, ``save_tokenizer`` the tokenizer, and ``run_in_workdir`` resumes
from the latest checkpoint (or starts fresh) and runs the loop; each run kind brings its trainer, its data and
its step.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any, Callable, Optional

import jax

from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.checkpoint.orbax_io import is_converted_dir
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.data.packing import make_dataset
from deepseek_jax.data.tasks.arithmetic import ARITHMETIC_TOKENIZER_CONFIG, arithmetic_tokenizer
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.quant.weights import Fp8Weight, with_fp8_shardings
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.feed import DevicePrefetch
from deepseek_jax.training.loop import run_loop, start_or_resume
from deepseek_jax.training.metrics import write_json
from deepseek_jax.training.trainer import Trainer


def prepare_workdir(workdir: str, config: ModelConfig, tc: TrainConfig, **records: dict) -> None:
    """Create ``workdir`` and write ``config.json``, ``train_config.json`` and ``{name}.json`` per record (what
    ``load_pretrained`` and a resumed run read back)."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_hf_dict())
    write_json(os.path.join(workdir, "train_config.json"), dataclasses.asdict(tc))
    for name, record in records.items():
        write_json(os.path.join(workdir, f"{name}.json"), record)


def save_tokenizer(workdir: str, tokenizer=None, *, arithmetic: bool = False, copy_from: Optional[str] = None):
    """``workdir/tokenizer.json`` (by process 0), so ``deepseek-jax generate --checkpoint WORKDIR`` encodes
    prompts as the run did: ``tokenizer``'s, else the one in ``copy_from`` (a checkpoint directory, with its
    ``tokenizer_config.json``), else the built-in arithmetic vocabulary's when ``arithmetic``, with a
    ``tokenizer_config.json`` naming its ``<bos>`` / ``<eos>`` (without it a prompt would be encoded without the
    BOS every training document starts with)."""
    if jax.process_index() != 0:
        return
    target = os.path.join(workdir, "tokenizer.json")
    if tokenizer is not None:
        tokenizer.save(target)
    elif copy_from is not None and os.path.isfile(os.path.join(copy_from, "tokenizer.json")):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(copy_from, name)):
                shutil.copy2(os.path.join(copy_from, name), os.path.join(workdir, name))
    elif arithmetic:
        arithmetic_tokenizer().save(target)
        write_json(os.path.join(workdir, "tokenizer_config.json"), ARITHMETIC_TOKENIZER_CONFIG)


def run_in_workdir(workdir: str, trainer: Trainer, data, fresh: Callable[[], dict],
                   step_fn: Callable[[Any, int], tuple[Any, dict]], *, desc: str,
                   postfix: Optional[Callable[[dict, bool], dict]] = None, mfu: bool = True,
                   plot: Optional[Callable[[list, str], None]] = None, save_every: int = 100, keep: int = 3,
                   resume: bool = True, progress: bool = True, async_save: bool = True,
                   stop_after: Optional[int] = None) -> list[dict]:
    """Resume from ``workdir``'s latest checkpoint (restoring ``data``'s position) or start from ``fresh()``, then
    run ``trainer.tc.steps`` steps of ``step_fn(state, step) -> (state, host metrics)`` (``training/loop.py``);
    ``stop_after`` ends this call after that many steps (tests); ``mfu``: log each step's model FLOPs utilization
    (``trainer.step_flops`` of the step's tokens and attended keys). Returns this call's metric records."""
    tc = trainer.tc
    if jax.process_index() == 0:  # train, distill and grpo alike (under LoRA: the adapters' values of the model's)
        trainable, total = trainer.trainable_count()
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})", file=sys.stderr)
    ckpt, start, state = start_or_resume(workdir, trainer, data, fresh, resume=resume, save_every=save_every,
                                         keep=keep, async_save=async_save)
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    def flops(m):
        return trainer.step_flops(m["input_tokens"], m["attended_keys"], m.get("selected_keys"))

    return run_loop(workdir, ckpt, state, start, end, tc.steps, step_fn, data.state, seed=tc.seed,
                    max_bad_steps=tc.max_bad_steps, progress=progress, desc=desc, postfix=postfix, plot=plot,
                    flops=flops if mfu else None)


def with_lora_base(tc: TrainConfig, init_from: Optional[str]) -> TrainConfig:
    """``tc`` with ``lora_base`` set to ``init_from`` (absolute) under LoRA, so that the run's checkpoints, which
    hold the adapters only, point at their base (``fit``, ``distill``, ``grpo``); LoRA without a base checkpoint is
    refused."""
    if not tc.lora_rank:
        return tc
    if init_from is None:
        raise ValueError("LoRA fine-tunes a checkpoint: give init_from (--init-from DIR)")
    return dataclasses.replace(tc, lora_base=os.path.abspath(init_from))


def fit(config: ModelConfig, tc: TrainConfig, workdir: str, *, mesh_spec: Optional[str] = None, mesh=None,
        data: Optional[str] = None, tokenizer=None, eos_id: Optional[int] = None, arithmetic_loss: str = "all",
        save_every: int = 100, keep: int = 3, resume: bool = True, progress: bool = True, async_save: bool = True,
        stop_after: Optional[int] = None, init_from: Optional[str] = None, chat_style: str = "v3",
        pipeline: str = "memory", data_workers: int = 0, adapters: Optional[dict] = None) -> list[dict]:
    """Train (or resume) in ``workdir``: checkpoints in ``workdir/checkpoints``, metrics in
    ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``, the loss curve in ``workdir/loss.png``.
    Returns this call's per-step metric records. ``stop_after`` ends early after that many steps (tests).
    ``arithmetic_loss``: on the built-in data, "all" tokens or only the "answers" count in the loss.
    ``init_from``: start from this checkpoint's weights (``init_params``; ``config`` must be its config, see
    ``checkpoint/load.py``'s ``pretrained_config``) instead of a random init; a checkpoint of this work directory,
    when there is one, still wins (the run resumes). ``chat_style``: the template chat ``.jsonl`` data is
    rendered with. ``mesh``: a ``jax.sharding.Mesh`` to run on instead of ``make_mesh(mesh_spec)`` (a multi-slice
    one, say). ``pipeline`` / ``data_workers``: ``make_dataset``'s ``pipeline`` / ``workers``. ``adapters``: a PEFT
    adapter's LoRA weights to start from (``Trainer.state_from_params``)."""
    tc = with_lora_base(tc, init_from)
    trainer = Trainer(config, tc, make_mesh(mesh_spec) if mesh is None else mesh)
    dataset = make_dataset(data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, tokenizer=tokenizer,
                           eos_id=eos_id, rows=trainer.process_rows(),
                           arithmetic_loss=arithmetic_loss, chat_style=chat_style, pipeline=pipeline,
                           workers=data_workers)
    if dataset.vocab_size > config.vocab_size:
        raise ValueError(f"the data's vocabulary has {dataset.vocab_size} ids but the model's vocab_size is "
                         f"{config.vocab_size}; set vocab_size >= {dataset.vocab_size}")
    prepare_workdir(workdir, config, tc)
    save_tokenizer(workdir, tokenizer, arithmetic=data in (None, "arithmetic"))
    fresh = (lambda: trainer.state_from_params(init_params(init_from, trainer), adapters)) \
        if init_from is not None else trainer.init_state

    feed = DevicePrefetch(dataset, trainer.put_batch)  # the next batch goes to the devices during this step

    def step_fn(state, step):
        state, metrics = trainer.run_step(state, next(feed))
        # a mixture's share of documents from each source so far
        return state, {**metrics, **feed.mixture_metrics()}

    def postfix(m, first):
        return dict(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_loss']:.3f}",
                    tok_s="-" if first else f"{m['tokens_per_s']:.0f}")

    try:
        return run_in_workdir(workdir, trainer, feed, fresh, step_fn, desc="train", postfix=postfix,
                              save_every=save_every, keep=keep, resume=resume,
                              progress=progress, async_save=async_save, stop_after=stop_after)
    finally:
        feed.close()  # the prefetch thread, and the Grain pipeline's worker processes


def init_params(path: str, trainer: Trainer):
    """The params of checkpoint ``path`` (HF safetensors, FP8 included; a converted Orbax directory; a train work
    directory) in fp32 master precision (a LoRA base: the compute dtype), placed straight into ``trainer``'s
    shardings: read shard by shard, never whole on a host. The checkpoint's config must be ``trainer.config``."""
    # fp32 master weights; a LoRA base in the compute dtype, or (QLoRA) its FP8 kernels as stored
    dtype = "fp8" if trainer.tc.fp8_base else trainer.model.options.params_dtype
    if is_converted_dir(path):
        config, params = load_pretrained(path, dtype=dtype, mesh=trainer.mesh)
    else:
        config, params = load_pretrained(path, dtype=dtype, shardings=trainer.base_shardings())
    if config != trainer.config:
        diff = [f"{f.name}: checkpoint {getattr(config, f.name)!r}, run {getattr(trainer.config, f.name)!r}"
                for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(trainer.config, f.name)]
        raise ValueError(f"{path}: the checkpoint's config differs from the run's ({'; '.join(diff)}); "
                         f"fine-tuning keeps the checkpoint's architecture")
    if trainer.tc.fp8_base:
        kept = [x for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight))
                if isinstance(x, Fp8Weight)]
        if not kept:
            raise ValueError(f"{path}: no FP8 weights to keep (--fp8-weights keeps the e4m3 kernels of an FP8 "
                             f"release or of a `convert --keep-fp8` directory)")
        print(f"base: {len(kept)} kernels kept in FP8 as stored ({sum(x.nbytes for x in kept) / 2**30:.3f} GiB with "
              f"their block scales)")
    # with LoRA: the base (state_from_params adds adapters)
    return jax.device_put(params, with_fp8_shardings(trainer.base_shardings(), params))
