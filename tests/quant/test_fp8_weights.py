"""deepseek_jax.quant.weights (``load_pretrained(..., dtype="fp8")``): FP8 weights kept as e4m3 + block scales on
the devices give the forward of the dequantized weights; memory is a byte per weight plus the scales."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_fixtures import TOKENS, make_fp8

import deepseek_jax as dsj
from deepseek_jax.checkpoint.hf_dir import HFCheckpoint
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.inference.generation import generate
from deepseek_jax.quant.weights import Fp8Weight

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers
FP32 = ModelOptions(dtype="float32")


def _is_fp8(x) -> bool:
    return isinstance(x, Fp8Weight)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8") / "release")
    make_fp8(path)  # 128x128 blocks, dimensions not multiples of 128 (partial edge blocks)
    return path


def _logits(config, params):
    model = dsj.Transformer(config, FP32)
    return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, TOKENS))


def test_fp8_kept_forward_equals_the_dequantized_forward(fp8_dir):
    config, kept = dsj.load_pretrained(fp8_dir, dtype="fp8")
    _, dequantized = dsj.load_pretrained(fp8_dir, dtype=jnp.float32)  # FP8 blocks dequantized on the host
    experts = kept["moe_layers"]["mlp"]["experts"]["gate_proj"]
    assert _is_fp8(experts) and experts.q.dtype == jnp.float8_e4m3fn and experts.scale.dtype == jnp.float32
    assert not _is_fp8(kept["lm_head"]["kernel"]) and not _is_fp8(kept["moe_layers"]["mlp"]["gate"]["kernel"])
    # Dequantized inside the step, in fp32 compute: the same products as the host's dequantization, so the same
    # logits (bound 1e-6; measured 0.0).
    np.testing.assert_allclose(_logits(config, kept), _logits(config, dequantized), atol=1e-6, rtol=0)
    # Memory: one byte per FP8 value plus the fp32 scales, exactly the checkpoint's (the MTP layer's copies of
    # embedding and head are not loaded).
    ckpt = HFCheckpoint(fp8_dir)
    fp8_keys = [k for k in ckpt.keys if ckpt.is_fp8(k)]
    want = sum(math.prod(ckpt.shape(k)) + 4 * math.prod(ckpt.shape(k + "_scale_inv")) for k in fp8_keys)
    leaves = jax.tree.leaves(kept, is_leaf=_is_fp8)
    assert sum(x.nbytes for x in leaves if _is_fp8(x)) == want
    assert sum(x.nbytes for x in leaves) < 0.45 * sum(x.nbytes for x in jax.tree.leaves(dequantized))


@pytest.mark.slow  # compiles prefill and decode twice: ~30 s on 2 cores
def test_fp8_kept_generation_equals_the_dequantized(fp8_dir):
    """Prefill and the absorbed decode path (which slices ``kv_b_proj``) on kept FP8 weights."""
    config, kept = dsj.load_pretrained(fp8_dir, dtype="fp8")
    _, dequantized = dsj.load_pretrained(fp8_dir, dtype=jnp.float32)
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :4].tolist()]
    a = generate(config, kept, prompts, max_new_tokens=6, eos_token_id=None, options=FP32, cache_dtype="float32")
    b = generate(config, dequantized, prompts, max_new_tokens=6, eos_token_id=None, options=FP32,
                 cache_dtype="float32")
    assert a.tokens == b.tokens


def test_convert_keep_fp8_directory_loads_as_fp8(fp8_dir, tmp_path):
    from deepseek_jax.checkpoint.convert.convert import convert

    convert(fp8_dir, str(tmp_path / "kept"), dtype="float32", keep_fp8=True, progress=False)
    config, kept = dsj.load_pretrained(tmp_path / "kept", dtype="fp8")
    _, dequantized = dsj.load_pretrained(fp8_dir, dtype=jnp.float32)
    assert _is_fp8(kept["dense_layers"]["self_attn"]["q_b_proj"]["kernel"])
    np.testing.assert_allclose(_logits(config, kept), _logits(config, dequantized), atol=1e-6, rtol=0)


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import deepseek_jax as dsj
from deepseek_jax.quant.weights import Fp8Weight
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from convert_fixtures import TOKENS
mesh = make_mesh("fsdp=2,expert=4")
config, kept = dsj.load_pretrained(sys.argv[1], dtype="fp8", mesh=mesh)
_, ref = dsj.load_pretrained(sys.argv[1], dtype=jnp.float32, mesh=make_mesh(None, jax.devices()[:1]))
model = dsj.Transformer(config, ModelOptions(dtype="float32"))
with mesh_context(mesh):
    a = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(kept, TOKENS))
b = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(ref, TOKENS))
w = kept["moe_layers"]["mlp"]["experts"]["gate_proj"]
# Every device's shard of q starts on a 128-block edge of the kernel's rows and columns, and its scale shard
# holds exactly the scales of those blocks.
whole = []
for leaf in jax.tree.leaves(kept, is_leaf=lambda x: isinstance(x, Fp8Weight)):
    if isinstance(leaf, Fp8Weight):
        scales = {d: s.index for s in leaf.scale.addressable_shards for d in [s.device]}
        lead = leaf.q.ndim - leaf.n_in - leaf.n_out
        for sh in leaf.q.addressable_shards:
            ok = True
            for g, (first, n) in enumerate([(lead, leaf.n_in), (lead + leaf.n_in, leaf.n_out)]):
                flat = (sh.index[first].start or 0) * int(np.prod(leaf.q.shape[first + 1:first + n]))
                ok &= flat % 128 == 0 and (scales[sh.device][lead + g].start or 0) == flat // 128
            ok &= all(sh.index[d] == scales[sh.device][d] for d in range(lead))
            whole.append(bool(ok))
# A `convert --keep-fp8` directory restores onto the same mesh with the same block-aligned shardings.
_, conv = dsj.load_pretrained(sys.argv[2], dtype="fp8", mesh=mesh)
same = jax.tree.leaves(jax.tree.map(lambda x, y: x.sharding.is_equivalent_to(y.sharding, x.ndim), kept, conv))
with mesh_context(mesh):
    c = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(conv, TOKENS))
print("RESULT " + json.dumps({"diff": float(np.abs(a - b).max()), "q_spec": [str(s) for s in w.q.sharding.spec],
                              "q_shards": len(w.q.addressable_shards),
                              "scale_spec": [str(s) for s in w.scale.sharding.spec], "whole": whole,
                              "converted_same_shardings": all(same), "converted_diff": float(np.abs(c - b).max())}))
"""


@pytest.mark.slow  # a subprocess compiling the sharded forward: ~30 s on 2 cores
def test_fp8_kept_sharded_on_8_devices(fp8_dir, tmp_path):
    from deepseek_jax.checkpoint.convert.convert import convert

    convert(fp8_dir, str(tmp_path / "kept"), dtype="float32", keep_fp8=True, progress=False)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SHARDED, fp8_dir, str(tmp_path / "kept")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    # The plain kernel splits experts over `expert` and the model dim (192) over `fsdp`; fsdp's 96-row shards would
    # cut a 128-block, so the e4m3 values drop it, and the scales are sharded exactly as they are.
    assert out["q_spec"] == ["None", "expert", "None", "None"] and out["q_shards"] == 8
    assert out["scale_spec"] == ["None", "expert", "None", "None"]
    assert out["whole"] and all(out["whole"])
    assert out["diff"] < 1e-5, out["diff"]
    assert out["converted_same_shardings"] and out["converted_diff"] < 1e-5, out


def test_fp8_shards_fall_on_block_edges():
    from jax.sharding import PartitionSpec as P

    from deepseek_jax.quant.weights import block_aligned_specs

    sizes = {"data": 1, "fsdp": 4, "expert": 8, "tensor": 2, "context": 1}
    # V3's expert stack [layers, E, D=7168, I=2048]: 7168 / 4 = 1792 rows = 14 blocks per shard: kept as is.
    q, s = block_aligned_specs(P(None, "expert", "fsdp", "tensor"), (58, 256, 7168, 2048), 1, 1, sizes)
    assert q == P(None, "expert", "fsdp", "tensor") and s == P(None, "expert", "fsdp", "tensor")
    # 192 rows over fsdp=4 (48 each) cut blocks: fsdp dropped; over ("fsdp", "tensor") only the prefix that fits.
    q, s = block_aligned_specs(P("fsdp", None), (192, 256), 1, 1, sizes)
    assert q == P(None, None) and s == P(None, None)
    q, s = block_aligned_specs(P(("tensor", "fsdp"), None), (512, 256), 1, 1, sizes)
    assert q == P("tensor", None) and s == P("tensor", None)  # 256 rows each; with fsdp too 64: not whole blocks
    # An output split over heads of a [kv_lora, heads, dim] kernel: (heads / ways) x dim columns must be whole
    # blocks (8 / 2 x 64 = 256: kept; the scale's column-block dim takes the same axes); a split of the inner dim
    # would cut the flattened columns into non-contiguous pieces: dropped.
    q, s = block_aligned_specs(P(None, "tensor", None), (512, 8, 64), 1, 2, sizes)
    assert q == P(None, "tensor", None) and s == P(None, "tensor")
    q, s = block_aligned_specs(P(None, None, "tensor"), (512, 8, 256), 1, 2, sizes)
    assert q == P(None, None, None) and s == P(None, None)
