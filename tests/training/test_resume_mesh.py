"""deepseek_jax.train.fit / Checkpointer: a training checkpoint written on one mesh resumes on another (fewer
devices, another mesh shape) with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers

# Train ``steps`` on the built-in data in ``workdir`` (resuming from its latest checkpoint), checkpoints every 3.
SCRIPT = r"""
import json, sys
import jax
from deepseek_jax.config import presets
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.run import fit
workdir, mesh, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = presets["tiny-v3-arith"].replace(num_hidden_layers=2)
tc = TrainConfig(steps=steps, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=2)
records = fit(config, tc, workdir, mesh_spec=mesh, save_every=3, progress=False, async_save=False)
print("RESULT " + json.dumps({"devices": jax.device_count(), "losses": {r["step"]: r["loss"] for r in records}}))
"""


def _run(workdir, devices: int, mesh: str, steps: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), mesh, str(steps)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert out["devices"] == devices
    return {int(k): v for k, v in out["losses"].items()}


@pytest.mark.slow  # two subprocesses, each compiling a sharded train step: 3.3 min on 2 shared cores
def test_checkpoint_from_8_devices_resumes_on_4_with_the_same_losses(tmp_path):
    full = tmp_path / "eight"
    reference = _run(full, 8, "data=2,fsdp=2,expert=2", 6)  # uninterrupted; checkpoints at steps 3 and 6
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    # As if preempted after step 3's checkpoint, then restarted on half the devices with another mesh shape:
    # Orbax restores every array straight into the new mesh's shardings (Trainer.abstract_state).
    resumed_dir = tmp_path / "four"
    shutil.copytree(full, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")
    resumed = _run(resumed_dir, 4, "fsdp=2,expert=2", 6)
    assert sorted(resumed) == [4, 5, 6]
    # Another device count changes the order of the reductions only: measured difference 2e-7 (rtol).
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)], rtol=1e-5)
    assert reference[6] < reference[1] - 0.3  # and the run really trains
