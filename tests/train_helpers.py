"""Shared by the training tests and the multi-device subprocesses they start."""

from __future__ import annotations

import numpy as np

import deepseek_jax as dsj
from deepseek_jax.training.config import TrainConfig

# Small but complete: a dense layer, an MoE layer (sigmoid, 4 groups, correction bias), an MTP module.
CONFIG = dsj.presets["tiny-v3"].replace(num_hidden_layers=2)
TRAIN = TrainConfig(batch_size=8, seq_len=16, steps=20, learning_rate=1e-2, warmup_steps=2,
                    bias_update_rate=0.01, balance_alpha=0.01, z_loss_weight=1e-3)


def batch(seed: int = 0, batch_size: int = 8, seq_len: int = 16) -> dict:
    """A packed batch: two documents in some rows, padding at the end of one."""
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, CONFIG.vocab_size, (batch_size, seq_len + 1))
    seg = np.ones((batch_size, seq_len), np.int32)
    seg[1, 9:] = 2
    seg[2, 12:] = 0
    pos = np.tile(np.arange(seq_len), (batch_size, 1))
    pos[1, 9:] = np.arange(seq_len - 9)
    pos[2, 12:] = 0
    mask = (seg > 0).astype(np.float32)
    mask[1, 8] = 0.0  # the target crossing the document boundary
    return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32),
            "positions": pos.astype(np.int32), "segment_ids": seg, "loss_mask": mask}


def run_steps(mesh_spec: str | None, n_steps: int = 2, devices=None, tc: TrainConfig = TRAIN, mesh=None):
    """Train ``n_steps`` on fixed batches (on ``mesh`` if given, else ``make_mesh(mesh_spec, devices)``); return the
    per-step losses and the final params (numpy)."""
    import jax

    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.trainer import Trainer

    trainer = Trainer(CONFIG, tc, make_mesh(mesh_spec, devices) if mesh is None else mesh)
    state = trainer.init_state()
    losses = []
    for i in range(n_steps):
        local = batch(i)
        if jax.process_count() > 1:  # this process's rows only (parts of them go to its devices)
            start, stop = trainer.process_rows()
            local = {k: v[start:stop] for k, v in local.items()}
        state, metrics = trainer.run_step(state, trainer.put_batch(local))
        losses.append(float(metrics["total_loss"]))
    from jax.experimental import multihost_utils

    params = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                          if jax.process_count() > 1 else np.asarray(x), state["params"])
    return losses, params, state


def run_grain_steps(mesh_spec: str, blocks: list, n_steps: int = 2) -> list[float]:
    """Train ``n_steps`` on the Grain pipeline's arithmetic batches (``make_dataset(pipeline="grain")``): in several
    processes each feeds the rows it reads itself (``rows=trainer.process_rows()``); in one, the row blocks
    ``blocks`` are read one by one, as those processes would, and stacked into the global batch."""
    import jax

    from deepseek_jax.data.packing import make_dataset
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.trainer import Trainer

    trainer = Trainer(CONFIG, TRAIN, make_mesh(mesh_spec))
    state = trainer.init_state()
    feeds = [make_dataset(None, seq_len=TRAIN.seq_len, batch_size=TRAIN.batch_size, rows=tuple(r), pipeline="grain")
             for r in ([trainer.process_rows()] if jax.process_count() > 1 else blocks)]
    losses = []
    for _ in range(n_steps):
        parts = [next(f) for f in feeds]
        state, metrics = trainer.run_step(state, trainer.put_batch(
            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
        losses.append(float(metrics["total_loss"]))
    return losses


def run_on_8_devices(script: str, timeout: int = 900) -> dict:
    """Run ``script`` in a subprocess on 8 simulated CPU devices (the repository and ``tests/`` on its path) and
    return the JSON it prints on its last ``RESULT `` line."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
