"""training/loop.py's run_loop keeps one step in flight: step k is dispatched before step k - 1's metrics are
fetched and logged, and a run of non-finite steps still stops the run; a run started afresh (no resume) in a
directory with checkpoints replaces them."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from deepseek_jax.training.checkpoints import Checkpointer
from deepseek_jax.training.loop import run_loop, start_or_resume


class _Checkpoints:
    def __init__(self):
        self.saved = []

    def save(self, step, state, meta, force=False):
        self.saved.append(step)

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def close(self):
        pass


def _run(tmp_path, skipped=lambda step: False, steps=5, ckpt=None):
    seen = []

    def step_fn(state, step):
        path = tmp_path / "metrics.jsonl"
        logged = path.read_text().splitlines() if path.exists() else []
        seen.append((step, len(logged)))
        return state + 1, {"loss": jnp.float32(step), "skipped": jnp.float32(skipped(step))}

    ckpt = ckpt or _Checkpoints()
    records = run_loop(str(tmp_path), ckpt, 0, 0, steps, steps, step_fn, lambda: {}, seed=0, max_bad_steps=2,
                       progress=False, plot=lambda rows, path: None)
    return seen, records, ckpt


def test_each_step_is_dispatched_before_the_previous_step_s_metrics_are_logged(tmp_path):
    seen, records, ckpt = _run(tmp_path)
    # When step k starts, only steps 0..k-2 are logged: step k - 1's metrics wait until step k is on its way.
    assert seen == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3)]
    assert [r["loss"] for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(isinstance(r["loss"], float) for r in records)  # fetched to the host
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert ckpt.saved == [1, 2, 3, 4, 5]


def test_bad_steps_stop_the_run_one_step_late(tmp_path):
    ckpt = _Checkpoints()
    with pytest.raises(FloatingPointError, match="2 steps in a row had a non-finite loss"):
        _run(tmp_path, skipped=lambda step: step >= 1, ckpt=ckpt)
    assert ckpt.saved == [1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Steps 1 and 2 were bad; step 3 ran before step 2's metrics said so, and is neither logged nor saved.
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 1.0)]


def test_no_resume_replaces_the_earlier_run_s_checkpoints(tmp_path, capsys):
    """``--no-resume`` in a work directory with checkpoints: they are deleted (and said so), so that the new run's
    saves of the same steps do not fail at its end ("Checkpoint for step 3 already exists")."""
    old = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=5, async_save=False)
    for step in (1, 2, 3):
        old.save(step, {"w": jnp.full(2, float(step))}, {"data": {}})
    old.close()
    ckpt, start, state = start_or_resume(str(tmp_path), None, None, lambda: {"w": jnp.zeros(2)}, resume=False,
                                         save_every=1, keep=5, async_save=False)
    assert start == 0 and state["w"].tolist() == [0.0, 0.0] and ckpt.latest_step() is None
    assert "deleted the 3 checkpoint(s) of the earlier run" in capsys.readouterr().err
    for step in (1, 2, 3):
        assert ckpt.save(step, {"w": jnp.full(2, -1.0)}, {"data": {}})
    ckpt.close()
