"""deepseek_jax.tools.plan on 8 simulated CPU devices: its figures are the compiler's, and a step that cannot fit
makes `deepseek-jax plan` exit non-zero with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
import deepseek_jax as dsj
from deepseek_jax.tools.hlo import count_collectives
from deepseek_jax.tools.plan import plan
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.mesh import mesh_context
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.trainer import BATCH_KEYS, Trainer

config = dsj.presets["tiny-v3"].replace(num_hidden_layers=2)
p = plan(config, mesh="data=2,fsdp=2,expert=2", batch=8, seq_len=32, cpu_devices=8, steps=["train", "decode"],
         precision="fp32", remat="none")
# The same train step compiled by hand, outside plan.py.
mesh = make_mesh("data=2,fsdp=2,expert=2")
trainer = Trainer(config, TrainConfig(batch_size=8, seq_len=32, precision="fp32", remat="none"), mesh)
state = trainer.abstract_state()
batch = {k: jax.ShapeDtypeStruct((8, 32), jnp.float32 if k == "loss_mask" else jnp.int32,
                                 sharding=trainer.batch_sharding) for k in BATCH_KEYS}
with mesh_context(mesh):
    compiled = trainer.step_fn(state).lower(state, batch).compile()
m = compiled.memory_analysis()
print("RESULT " + json.dumps({
    "plan": p.to_dict(),
    "ref": {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes},
    "ref_collectives": {k: [v.count, v.bytes] for k, v in count_collectives(compiled.as_text()).items()},
    "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
}))
"""


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_plan_figures_are_the_compilers():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(), capture_output=True, text=True, timeout=900,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    train, decode = out["plan"]["steps"]
    assert train["name"] == "train" and decode["name"] == "decode"
    for key, value in out["ref"].items():
        assert train[key] == value, key
    assert train["peak_bytes"] == train["argument_bytes"] + train["output_bytes"] - train["alias_bytes"] + \
        train["temp_bytes"]
    # The state is donated: the new state aliases it.
    assert train["alias_bytes"] > 0 and train["fits"]
    # Weights and Adam moments are FSDP-sharded over fsdp x expert (4 ways) and replicated over data.
    assert train["state_bytes"] == pytest.approx(out["state_bytes"] / 4, rel=0.02)
    assert {k: [v["count"], v["bytes"]] for k, v in train["collectives"].items()} == out["ref_collectives"]
    assert train["collectives"]["all-reduce"]["count"] > 0  # data-parallel gradient reduction at least
    assert decode["fits"] and decode["flops"] > 0 and train["flops"] > decode["flops"]


@pytest.mark.slow
def test_plan_exits_nonzero_when_a_step_does_not_fit(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "plan", "tiny-v3", "--set", "num_hidden_layers=2",
                           "--cpu-devices", "8", "--mesh", "data=2,fsdp=2,expert=2", "--batch", "8", "--seq-len", "32",
                           "--steps", "decode", "--device-memory", "100KB", "--json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "the decode step does not fit" in errors[0], errors
    assert errors[0].endswith("a cpu device has 100.00 KB"), errors
    data = json.loads(out.read_text())
    assert data["fits"] is False and data["device_memory"] == 100_000
    assert data["steps"][0]["peak_bytes"] > 100_000


def test_plan_table_says_what_a_ragged_exchange_moves_under_balanced_routing():
    """A dropless ragged all-to-all's buffer holds EP x a device's rows; balanced, a device receives 1 / EP of it,
    (EP - 1) / EP of that from other chips: 5.17 GB of buffers on expert=8 -> 0.65 GB received, 0.57 GB remote."""
    from deepseek_jax.tools.hlo import CollectiveStats
    from deepseek_jax.tools.plan import Plan, StepPlan

    step = StepPlan("train", True, temp_bytes=19 * 10**9, collectives={"ragged-all-to-all": CollectiveStats(9, 5.17e9),
                                                "all-gather": CollectiveStats(12, 8.46e9)})
    plan = Plan("m", "v5p:4x4x4", "TPU v5", 64, None, {"fsdp": 8, "expert": 8}, 64, 1024, 1024, "bf16", "full", 1,
                [step])
    line = [x for x in plan.table().splitlines() if "balanced routing" in x]
    assert line == ["train: under balanced routing the ragged all-to-alls receive ~0.65 GB per step (1/8 of the "
                    "buffers, dropless), 0.57 GB of it from other chips (by hand)"]
    plan.mesh = {"fsdp": 64}
    assert "balanced routing" not in plan.table()


V4_SCRIPT = r"""
import json
import deepseek_jax as dsj
from deepseek_jax.layers import kv_cache
from deepseek_jax.tools.plan import plan

config = dsj.presets["tiny-v4"]
p = plan(config, mesh="data=2,expert=4", batch=8, seq_len=32, cpu_devices=8, steps=["decode"])
print("RESULT " + json.dumps({"plan": p.to_dict(),
                              "cache": sum(kv_cache.v4_cache_bytes(config, 32, "bfloat16").values())}))
"""


def test_plan_compiles_v4_decode_over_its_compressed_cache():
    """V4's decode step compiles over the mesh (experts over 4 devices, the batch over all 8), and the cache it
    donates is exactly ``v4_cache_bytes`` per sequence (window rings, pools, indexer keys, fp32 compressor state),
    one of the 8 sequences per device."""
    proc = subprocess.run([sys.executable, "-c", V4_SCRIPT], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    (decode,) = out["plan"]["steps"]
    assert decode["name"] == "decode" and decode["fits"]
    assert decode["alias_bytes"] == out["cache"]  # 8 sequences over 8 devices


@pytest.mark.slow  # two train steps compiled: ~1 min on 2 cores
def test_plan_compiles_a_qlora_train_step_over_the_fp8_base():
    """``plan --lora-rank R --weight-dtype fp8``: the LoRA step's frozen base holds the release's FP8 kernels
    (e4m3, 1 byte a value, and fp32 scales per 128x128 block) in place of the bf16 ones (2 bytes): its state is
    smaller by exactly that, and the step compiles."""
    import math

    import flax.linen as nn

    import deepseek_jax as dsj
    from deepseek_jax.models.transformer import abstract_params
    from deepseek_jax.tools.capacity import fp8_kept_kernels
    from deepseek_jax.tools.plan import plan

    config = dsj.presets["tiny-v3"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    steps = {}
    for fp8 in (False, True):
        p = plan(config, batch=2, seq_len=32, cpu_devices=1, steps=["train"], precision="bf16",
                 train_overrides={"lora_rank": 4, "fp8_base": fp8})
        steps[fp8] = p.steps[0]
    params = nn.meta.unbox(abstract_params(config))
    saved = 0
    for path, (_, _, grid, _) in fp8_kept_kernels(config).items():
        node = params
        for k in path:
            node = node[k]
        n = math.prod(node.shape)
        saved += 2 * n - n - 4 * math.prod(grid)
    assert saved > 0 and steps[True].compiled
    assert steps[False].state_bytes - steps[True].state_bytes == saved
    assert steps[False].argument_bytes - steps[True].argument_bytes == saved
