"""deepseek_jax on a mesh of 8 simulated CPU devices for a dense R1-Distill student (tiny Qwen2, tied head, q/k/v
bias, GQA): sharded train steps (FSDP, tensor over the heads and the key/value heads, context parallelism) and
sharded generation equal one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers
SPECS = ["data=2,fsdp=2,tensor=2", "fsdp=2,context=2,tensor=2"]
SCRIPT = r"""
SPECS = """ + repr(SPECS) + r"""
import json, jax, numpy as np, flax.linen as nn, jax.numpy as jnp
import deepseek_jax as dsj
import train_helpers as th
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.rules import param_shardings
config = dsj.presets["tiny-qwen2"].replace(tie_word_embeddings=True)
th.CONFIG = config  # run_steps / batch read the module's CONFIG
out = {}
ref_losses, ref_params, _ = th.run_steps(None, devices=jax.devices()[:1])
out["ref"] = ref_losses
for spec in SPECS:
    losses, params, state = th.run_steps(spec)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    k = state["params"]["dense_layers"]["self_attn"]["k_proj"]["kernel"]
    out[spec] = {"losses": losses, "max_param_diff": diff, "k_spec": [list(a) if isinstance(a, tuple) else a
                                                                       for a in k.sharding.spec]}
params = nn.meta.unbox(jax.jit(dsj.Transformer(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
rng = np.random.RandomState(0)
prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 9, 3, 12)]
gen = {}
for name, mesh in (("one", None), ("data=2,fsdp=2,tensor=2", make_mesh("data=2,fsdp=2,tensor=2"))):
    r = dsj.generate(config, params, prompts, max_new_tokens=6, eos_token_id=None, mesh=mesh)
    gen[name] = [list(map(int, t)) for t in r.tokens]
out["generate"] = gen
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_train_and_generate_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    for spec in SPECS:
        np.testing.assert_allclose(out[spec]["losses"], out["ref"], rtol=1e-5, err_msg=spec)
        assert out[spec]["max_param_diff"] < 1e-5, (spec, out[spec]["max_param_diff"])
    # k_proj [layers, embed, kv_heads, head_dim]: the model dim FSDP-split, the 2 key/value heads over tensor.
    assert out["data=2,fsdp=2,tensor=2"]["k_spec"][2] == "tensor"
    assert out["generate"]["data=2,fsdp=2,tensor=2"] == out["generate"]["one"]


@pytest.mark.slow
def test_plan_accepts_a_student_preset(tmp_path):
    """`deepseek-jax plan` on the 1.5B student (2 layers) over 8 simulated devices: its parameter count is the
    formula's, and the fp32 train state (params + two Adam moments, 12 bytes a parameter) is split 8 ways."""
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "plan", "r1-distill-qwen-1.5b", "--set", "num_hidden_layers=2",
           "--cpu-devices", "8", "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq-len", "64",
           "--steps", "train,decode", "--precision", "fp32", "--remat", "none", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    # 2 x embedding (untied) 151936 x 1536 + final norm + 2 layers x 46,797,824 (test_students._formula)
    assert plan["params"] == 2 * 151936 * 1536 + 1536 + 2 * 46_797_824 == 560_344_576
    train, decode = plan["steps"]
    assert train["state_bytes"] == pytest.approx(12 * plan["params"] / 8, rel=0.01)
    assert train["fits"] and decode["fits"]
