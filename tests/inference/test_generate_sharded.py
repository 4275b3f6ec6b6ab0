"""deepseek_jax.inference.generation on a mesh: sharded prefill/decode give the same tokens as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers

# Expert parallelism in prefill and decode: rows by all-to-all where the sequences split over `expert`
# (expert=4,data=2: 4 sequences over 4 expert devices), a psum over `expert` where they do not (expert=8).
MESHES = ["data=2,fsdp=2,tensor=2", "expert=2,data=4", "expert=4,data=2", "expert=8"]
SCRIPT = r"""
MESHES = """ + repr(MESHES) + r"""
import json, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
import deepseek_jax as dsj
from deepseek_jax.layers import kv_cache as kvcache
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.inference.sampling import SamplingParams
config = dsj.presets["tiny-v3"]
params = nn.meta.unbox(jax.jit(dsj.Transformer(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
rng = np.random.RandomState(0)
prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 9, 3, 12)]
out = {}
for name, mesh in [("one", None)] + [(m, make_mesh(m)) for m in MESHES]:
    res = {}
    for spec in (False, True):
        r = dsj.generate(config, params, prompts, max_new_tokens=6, eos_token_id=None, speculative=spec, mesh=mesh)
        res[str(spec)] = [list(map(int, t)) for t in r.tokens]
    s = dsj.generate(config, params, prompts, max_new_tokens=6, eos_token_id=None, mesh=mesh,
                     sampling=SamplingParams(temperature=0.8, top_k=20), seed=3)
    res["sampled"] = [list(map(int, t)) for t in s.tokens]
    out[name] = res
mesh = make_mesh("data=2,fsdp=2,tensor=2")
cache = kvcache.init_cache(config, 4, 32, "float32", mtp=True)
sh = kvcache.cache_shardings(cache, mesh)
out["cache_specs"] = [list(sh["main"]["moe_layers"]["c_kv"].spec), list(sh["mtp"]["mtp_0"]["k_pe"].spec)]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_generation_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    for mesh in MESHES:
        assert out[mesh] == out["one"], mesh  # greedy, speculative greedy and seeded sampling, token for token
    # The cache is split over the batch axes: [layers, batch, slots, rank] and the MTP's [batch, slots, rope].
    assert out["cache_specs"] == [[None, ["data", "fsdp"], None, None], [["data", "fsdp"], None, None]]


ENGINE_SCRIPT = r"""
import json, jax, jax.numpy as jnp, numpy as np
from tiny_inference import tiny_checkpoint
import deepseek_jax as dsj
from deepseek_jax.inference.engine import Engine, Request
from deepseek_jax.parallel.mesh import make_mesh
config, params, _, _ = tiny_checkpoint("tiny-v3")
rng = np.random.RandomState(1)
prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 9, 40, 3, 12)]
ref = [list(map(int, dsj.generate(config, params, [p], max_new_tokens=8, eos_token_id=None,
                                  prefill_chunk=16).tokens[0])) for p in prompts]
out = {}
for spec in (False, True):
    engine = Engine(config, params, slots=8, max_len=96, window_min=16, prefill_chunk=16, steps_per_call=2,
                    speculative=spec, mesh=make_mesh("expert=4,data=2"))
    toks, fin = {i: [] for i in range(len(prompts))}, {}
    for i, p in enumerate(prompts):
        engine.submit(Request(p, 8, lambda text, tok, lp, f, i=i: (toks[i].append(tok) if tok is not None else None,
                                                                   f and fin.setdefault(i, f))))
    for _ in range(100):
        if len(fin) == len(prompts):
            break
        engine.run_once()
    out[str(spec)] = {"tokens": [toks[i] for i in range(len(prompts))], "fin": [fin.get(i) for i in range(len(prompts))],
                      "pool": str(jax.tree.leaves(engine.cache["main"])[0].sharding.spec)}
print("RESULT " + json.dumps({"ref": ref, **out}))
"""


@pytest.mark.slow
def test_serving_engine_on_a_mesh_gives_one_device_tokens():
    """The serving engine on 8 simulated devices (``expert=4,data=2``: the pool's 8 slots over the batch axes, the
    one-row prefills replicated), plain and speculative, with a prompt filled in chunks: greedy tokens equal
    one-device ``generate``'s."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    for spec in ("False", "True"):
        assert out[spec]["fin"] == ["length"] * 5, spec
        assert out[spec]["tokens"] == out["ref"], spec
        assert "data" in out[spec]["pool"] and "expert" in out[spec]["pool"], out[spec]["pool"]
