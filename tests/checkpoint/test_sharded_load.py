"""deepseek_jax.checkpoint.sharded_load on 8 simulated CPU devices: an HF directory (sharded index, FP8 blocks with partial
edges) loads straight into its shards, equal to reading whole tensors; each shard reads only its own rows and
columns; host memory beyond the params themselves does not grow with the number of layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers

SCRIPT = r"""
import json, math, sys
import jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.checkpoint.hf_dir import HFCheckpoint, iter_leaves
from deepseek_jax.checkpoint.hf_map import hf_tensor_map
from deepseek_jax.checkpoint.sharded_load import load_sharded
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.rules import param_shardings
from convert_fixtures import make_fp8

path = sys.argv[1]
make_fp8(path, n_files=3)
config = dsj.ModelConfig.from_pretrained(path)
ckpt = HFCheckpoint(path)
maps = hf_tensor_map(config)
# The reference: every tensor read whole and dequantized whole (the converter's reader).
ref = {tm.path: arr for tm, arr in iter_leaves(ckpt, config, maps)}
mesh = make_mesh("fsdp=2,expert=2,tensor=2")
boxed = jax.eval_shape(dsj.Transformer(config).init, jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))["params"]
shardings = param_shardings(boxed, mesh)
reads = []
params = load_sharded(ckpt, maps, shardings, {n for n, _, _ in config.layer_runs}, reads=reads)
out = {"diff": 0.0, "sharded": 0, "partial_reads": 0, "whole_reads_of_split_leaves": []}
for tm in maps:
    leaf = params
    for k in tm.path:
        leaf = leaf[k]
    out["diff"] = max(out["diff"], float(np.abs(np.asarray(leaf, np.float32) - ref[tm.path].astype(np.float32)).max()))
    out["sharded"] += len({str(s.index) for s in leaf.addressable_shards}) > 1
    n_lead = len(tm.sources[0][1])
    split_item = any(e is not None for e in list(leaf.sharding.spec)[n_lead:])
    keys = {k for k, _ in tm.sources}
    for key, rows, cols in reads:
        if key not in keys:
            continue
        whole = (rows == (0, tm.hf_shape[0])) and (cols is None or cols == (0, tm.hf_shape[1]))
        out["partial_reads"] += not whole
        if split_item and whole:
            out["whole_reads_of_split_leaves"].append(key)
# The public entry point reads the same way.
_, via_api = dsj.load_pretrained(path, mesh=mesh)
out["api_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(via_api), jax.tree.leaves(params)))
out["fp8"] = sum(ckpt.is_fp8(k) for tm in maps for k, _ in tm.sources)
print("RESULT " + json.dumps(out))
"""

RSS_SCRIPT = r"""
import json, os, resource, sys
import jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh
_, params = dsj.load_pretrained(sys.argv[1], mesh=make_mesh("fsdp=2,expert=4"))
jax.block_until_ready(params)
own = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"peak": peak, "own": own}))
"""


def _env():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(script, *args):
    proc = subprocess.run([sys.executable, "-c", script, *args], env=_env(), capture_output=True, text=True,
                          timeout=1200, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])


@pytest.mark.slow
def test_sharded_load_of_an_fp8_hf_directory(tmp_path):
    out = _run(SCRIPT, str(tmp_path / "fp8"))
    assert out["fp8"] > 0 and out["sharded"] > 10
    assert out["diff"] == 0.0  # the same values, bit for bit, as dequantizing whole tensors
    assert out["api_equal"]
    # Every shard of a leaf split along its own dims read only a part of each source tensor.
    assert out["partial_reads"] > 0 and out["whole_reads_of_split_leaves"] == []


@pytest.mark.slow
def test_host_memory_does_not_grow_with_layers(tmp_path):
    """Peak RSS of a sharded load minus the params' own bytes (on CPU devices they live in host memory): about
    the same for 2 and 8 layers (0.4 and 1.5 GB of weights)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_memory", os.path.join(HERE, "..", "bench",
                                                                                 "convert_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    transient = {}
    for layers in (2, 8):
        path = str(tmp_path / f"l{layers}")
        bench.write_synthetic(path, bench.wide_config(layers))
        r = _run(RSS_SCRIPT, path)
        transient[layers] = r["peak"] - r["own"]
    assert transient[8] < transient[2] + 0.15e9, transient
