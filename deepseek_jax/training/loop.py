"""The training loop shared by ``train``, ``distill`` and ``grpo``: resume, steps, metrics, checkpoints, curve."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax

from deepseek_jax.training.checkpoints import Checkpointer
from deepseek_jax.training.metrics import log_line, metrics_to_host, mfu
from deepseek_jax.training.trainer import Trainer


def start_or_resume(workdir: str, trainer: Trainer, data, fresh: Callable[[], dict], *, resume: bool,
                    save_every: int, keep: int, async_save: bool = True) -> tuple["Checkpointer", int, dict]:
    """The run's ``Checkpointer`` (``workdir/checkpoints``) and where the run starts: the latest checkpoint when
    ``resume`` finds one (its data position restored into ``data``, which has ``restore(state)``; a LoRA run's
    checkpoint holds its adapters and their optimizer state, and ``fresh()`` gives the base again), else step 0
    with ``fresh()``'s state."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=save_every, keep=keep, async_save=async_save,
                        to_saved=getattr(trainer, "saved_state", None))
    start = ckpt.latest_step() if resume else None
    if not resume and ckpt.latest_step() is not None:  # their steps would clash with this run's saves
        steps = ckpt.delete_all()
        print(f"starting afresh (no resume): deleted the {len(steps)} checkpoint(s) of the earlier run in "
              f"{os.path.join(workdir, 'checkpoints')} (steps {', '.join(map(str, steps))})", file=sys.stderr)
    if start is None:
        return ckpt, 0, fresh()
    saved, meta = ckpt.restore(start, trainer.saved_state(trainer.abstract_state()))
    state = trainer.from_saved(saved, fresh) if trainer.lora is not None else saved
    data.restore(meta["data"])
    return ckpt, start, state


def run_loop(workdir: str, ckpt: "Checkpointer", state, start: int, end: int, total: int,
             step_fn: Callable[[Any, int], tuple[Any, dict]], data_state: Callable[[], dict], *, seed: int,
             max_bad_steps: int, progress: bool = True, desc: str = "train",
             postfix: Optional[Callable[[dict, bool], dict]] = None,
             flops: Optional[Callable[[dict], float]] = None,
             plot: Callable[[list, str], None] = None) -> list[dict]:
    """The loop shared by ``train``, ``distill`` and ``grpo``: steps ``start..end-1`` of ``total``, each
    ``step_fn(state, step) -> (state, metrics)`` (device arrays or host values: they are fetched one step
    late); a progress bar (``postfix(metrics, first_step)``), one JSON
    line per step in ``workdir/metrics.jsonl`` (records past ``start`` from an earlier run are dropped) and
    TensorBoard scalars in ``workdir/tb``; a checkpoint every ``ckpt``'s interval and at ``total`` with
    ``data_state()`` and the seed; a stop after ``max_bad_steps`` skipped (non-finite) steps in a row (seen one
    step late: the step after the last bad one has run, and is neither logged nor saved); the curve
    (``plot``, default ``plot_loss_curve``) in ``workdir/loss.png`` at the end. Closes ``ckpt``."""
    from tqdm import tqdm

    plot = plot_loss_curve if plot is None else plot
    main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    history = _read_history(metrics_path, upto=start) if main else []
    writer = None
    records = []
    try:
        if main:
            _rewrite_history(metrics_path, history)
            from tensorboardX import SummaryWriter
            writer = SummaryWriter(os.path.join(workdir, "tb"))
        bar = tqdm(range(start, end), initial=start, total=total, desc=desc, disable=not (progress and main),
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        bad_run = 0

        def finish(step: int, m: dict) -> None:
            """Step ``step``'s metrics to the host (this waits for that step, not for the one queued after it),
            then logged and checked."""
            nonlocal t_last, bad_run
            m = metrics_to_host(m)
            t = time.perf_counter()
            m["step"] = step + 1
            # Real (non-padding) tokens over the step's wall time; the first step of a process compiles, so
            # it has no rate.
            first = step == start
            if "input_tokens" in m:
                m["tokens_per_s"] = None if first else m["input_tokens"] / max(t - t_last, 1e-9)
                if flops is not None:
                    m["mfu"] = None if first else mfu(flops(m), t - t_last)
            t_last = t
            records.append(m)
            if main:
                with open(metrics_path, "a") as f:
                    f.write(log_line(m) + "\n")
                for k, v in m.items():
                    if isinstance(v, float):
                        writer.add_scalar(f"{desc}/{k}", v, step + 1)
                if postfix is not None:
                    bar.set_postfix(**postfix(m, first))
            bad_run = bad_run + 1 if m.get("skipped") else 0
            if bad_run >= max_bad_steps:
                raise FloatingPointError(
                    f"step {step + 1}: {bad_run} steps in a row had a non-finite loss or gradient (loss "
                    f"{m.get('total_loss')}, grad norm {m.get('grad_norm')}); their updates were skipped and the "
                    f"run stops. The last good checkpoint is step {ckpt.latest_step()} in "
                    f"{os.path.join(workdir, 'checkpoints')}")

        # One step in flight: step k is dispatched before step k - 1's metrics are fetched, so the host prepares
        # the next batch while the device runs, and a metric never makes the device wait for the host.
        pending = None
        for step in bar:
            state, m = step_fn(state, step)
            if pending is not None:
                finish(*pending)
            pending = (step, m)
            ckpt.save(step + 1, state, {"data": data_state(), "seed": seed, "step": step + 1},
                      force=(step + 1 == total))
        if pending is not None:
            finish(*pending)
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()
    if main:
        plot(_read_history(metrics_path), os.path.join(workdir, "loss.png"))
    return records


def _read_history(path: str, upto: Optional[int] = None) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def _rewrite_history(path: str, rows: list[dict]) -> None:
    """On resume, drop records past the restored step (they will be recomputed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(log_line(r) + "\n")
    os.replace(tmp, path)


def plot_loss_curve(rows: list[dict], path: str) -> None:
    if not rows:
        return
    # A bare Figure (no pyplot): drawing to a file leaves the caller's backend alone (a notebook's inline one).
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in rows], label="next-token CE")
    if any(r.get("mtp_loss") for r in rows):
        ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP loss (weighted)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
