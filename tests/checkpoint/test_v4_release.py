"""DeepSeek-V4's release format read directly: routed experts in FP4 (two e2m1 per int8, one e8m0 scale per row
and 32 inputs), the attention's and shared expert's linears in FP8 (e4m3, ue8m0 128 x 128 blocks), each scale
under ``<name>.scale``. The reference is transformers reading the same files (``FineGrainedFP8Config(
dequantize=True, expert_dtype="fp4")``): ``load_pretrained`` (whole, onto a mesh, FP8 and FP4 kept on the devices)
and ``convert`` (with and without ``--keep-fp8``) give its logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from convert_fixtures import fp4_quantize, make_v4_release, read_all
from hf_reference import hf_v4, torch_logits
from safetensors.torch import save_file

import deepseek_jax as dsj
from deepseek_jax.checkpoint.safetensors_io import CheckpointError
from deepseek_jax.quant import fp4
from deepseek_jax.quant.weights import Fp4Weight, Fp8Weight

TINY = dsj.presets["tiny-v4"]
TOKENS = np.random.RandomState(5).randint(0, TINY.vocab_size, (2, 13))
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fp4_dequantize_equals_transformers():
    """Random bytes and e8m0 (and fp32) scales: ``quant/fp4.py``'s values equal transformers' FP4 dequantizer,
    whole and for any region (rows and columns not on a group edge); ``quantize`` is its inverse on e2m1 grid
    values, and fails on an input dim that is not a multiple of 32."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    rng = np.random.RandomState(0)
    packed = rng.randint(-128, 128, (24, 48)).astype(np.int8)  # [out 24, in 96]
    exps = rng.randint(-6, 4, (24, 3)).astype(np.float32)
    for scales, torch_dtype in ((np.exp2(exps).astype(ml_dtypes.float8_e8m0fnu), torch.float8_e8m0fnu),
                                (np.exp2(exps) * 1.5, torch.float32)):
        t_scales = torch.from_numpy(np.asarray(scales, np.float32)).to(torch_dtype)
        ref = Fp8Dequantize(None)._dequantize_one(torch.from_numpy(packed), t_scales, torch.float32).numpy()
        np.testing.assert_array_equal(fp4.dequantize(packed, scales), ref)
        np.testing.assert_array_equal(fp4.dequantize(packed, scales, (3, 17), (5, 71)), ref[3:17, 5:71])
    whole = fp4.dequantize(packed, np.exp2(exps)) + 0.0  # on the grid of e8m0 scales; -0 as +0
    q, s = fp4.quantize(whole)
    np.testing.assert_array_equal(fp4.dequantize(q, s), whole)
    t_q, t_s = fp4_quantize(torch.from_numpy(whole))  # the fixture's own packer writes the same bytes
    np.testing.assert_array_equal(t_q.numpy(), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        fp4.quantize(np.ones((2, 40), np.float32))
    with pytest.raises(ValueError, match=r"expected \[24, 3\]"):
        fp4.dequantize(packed, np.ones((24, 2), np.float32))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny V4 model written in the release format, and transformers' logits reading it back."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    path = str(tmp_path_factory.mktemp("v4rel"))
    make_v4_release(path, hf_v4(TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32,
            quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4"))
    return path, torch_logits(ref.eval(), TOKENS)


def _logits(config, params) -> np.ndarray:
    return np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(TOKENS)))


def test_release_loads_and_converts_to_transformers_logits(release, tmp_path):
    """``load_pretrained`` of the release (fp32), its ``dtype="fp8"`` load (the FP8 linears stay e4m3 on the
    device, the FP4 experts e2m1 codes as ``uint4`` with bf16 scales), and ``convert`` with and without
    ``--keep-fp8`` (which dequantizes the FP4 experts): logits equal transformers' to 1e-5 (measured 3.5e-6)."""
    from deepseek_jax.checkpoint.convert.convert import convert

    path, ref = release
    stored = read_all(path)
    assert stored["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert stored["layers.1.ffn.experts.0.w1.scale"].shape == (TINY.moe_intermediate_size, TINY.hidden_size // 32)
    assert stored["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, params = dsj.load_pretrained(path, dtype=jnp.float32)
        assert config == TINY
        assert np.abs(_logits(config, params) - ref).max() <= 1e-5
        _, kept = dsj.load_pretrained(path, dtype="fp8")
        assert isinstance(kept["moe_csa_1"]["self_attn"]["q_b_proj"]["kernel"], Fp8Weight)
        experts = kept["moe_csa_1"]["mlp"]["experts"]["gate_proj"]
        assert isinstance(experts, Fp4Weight) and experts.q.dtype == jnp.uint4
        assert experts.nbytes * 8 == experts.q.size * 4 + experts.scale.size * 16  # half a byte a weight + bf16 scales
        np.testing.assert_array_equal(np.asarray(experts.dequantize()),
                                      np.asarray(params["moe_csa_1"]["mlp"]["experts"]["gate_proj"]))
        assert np.abs(_logits(config, kept) - ref).max() <= 1e-5
        for keep in (False, True):
            out = str(tmp_path / f"orbax{keep}")
            convert(path, out, dtype="float32", keep_fp8=keep, progress=False)
            assert np.abs(_logits(*dsj.load_pretrained(out, dtype=jnp.float32)) - ref).max() <= 1e-5


def test_export_fp8_writes_the_release_format_back(release, tmp_path):
    """``export --fp8`` of a converted release writes V4's format: FP4 experts (int8-packed, e8m0 scales) and
    ue8m0 FP8 linears, ``expert_dtype: fp4`` in config.json. The values round-trip exactly (re-quantizing e2m1
    and e4m3 values on power-of-two scales loses nothing), so transformers reads the export with the release's
    logits."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from deepseek_jax.checkpoint.convert.convert import convert
    from deepseek_jax.checkpoint.convert.export import export

    path, ref = release
    orbax, out = str(tmp_path / "orbax"), str(tmp_path / "out")
    convert(path, orbax, dtype="float32", progress=False)
    export(orbax, out, fp8=True, progress=False)
    a, b = read_all(path), read_all(out)
    key = "layers.1.ffn.experts.5.w2.weight"
    assert b[key].dtype == torch.int8 and b[key[: -len("weight")] + "weight_scale_inv"].dtype == torch.float8_e8m0fnu
    for k in (key, "layers.1.ffn.experts.0.w1.weight"):
        s_a, s_b = (t[k[: -len("weight")] + suffix].float().numpy()
                    for t, suffix in ((a, "scale"), (b, "weight_scale_inv")))
        np.testing.assert_array_equal(fp4.dequantize(b[k].numpy(), s_b), fp4.dequantize(a[k].numpy(), s_a))
    with open(os.path.join(out, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    assert q["expert_dtype"] == "fp4" and q["scale_fmt"] == "ue8m0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32,
            quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4"))
    assert np.abs(torch_logits(back.eval(), TOKENS) - ref).max() <= 1e-5


MESH_SCRIPT = r"""
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
import deepseek_jax as dsj
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.parallel.mesh import make_mesh, mesh_context
from deepseek_jax.quant.weights import Fp4Weight
warnings.simplefilter("ignore")
tokens = np.asarray(json.loads(sys.argv[2]), np.int32)
mesh = make_mesh("fsdp=2,expert=4")
config, whole = dsj.load_pretrained(sys.argv[1], dtype=np.float32)
_, sharded = dsj.load_pretrained(sys.argv[1], dtype=np.float32, mesh=mesh)
_, kept = dsj.load_pretrained(sys.argv[1], dtype="fp8", mesh=mesh)
model = dsj.Transformer(config, ModelOptions(dtype="float32"))
with mesh_context(mesh):
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(kept, tokens))
w = kept["moe_csa_1"]["mlp"]["experts"]["gate_proj"]
print("RESULT " + json.dumps({
    "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(whole), jax.tree.leaves(sharded))),
    "kept_fp4": isinstance(w, Fp4Weight) and str(w.q.dtype) == "uint4",
    "q_spec": [str(e) for e in w.q.sharding.spec], "scale_spec": [str(e) for e in w.scale.sharding.spec],
    "logits": logits.tolist()}))
"""


@pytest.mark.slow  # a subprocess loading three ways and compiling the sharded forward: ~1 min on 2 cores
def test_release_loads_onto_a_mesh_shard_by_shard(release):
    """On 8 simulated devices (fsdp=2, expert=4) each shard dequantizes its own rows and columns of the FP4
    experts: the params equal the whole load bit for bit. Kept (``dtype="fp8"``), the experts stay FP4 (``uint4``
    codes, bf16 scales) split over experts and, on 32-input group edges, over fsdp; the sharded forward with
    expert parallelism gives transformers' logits."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", MESH_SCRIPT, release[0], json.dumps(TOKENS.tolist())],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert out["equal"] and out["kept_fp4"]
    assert out["q_spec"][:3] == ["None", "expert", "fsdp"] and out["scale_spec"][:3] == ["None", "expert", "fsdp"]
    assert np.abs(np.asarray(out["logits"]) - release[1]).max() <= 1e-5


def test_bad_fp4_scale_is_named(release, tmp_path):
    """An FP4 weight whose scale has the wrong grid fails with the file, the tensor, and expected vs found."""
    from deepseek_jax.checkpoint.convert.convert import convert

    path = str(tmp_path / "bad")
    os.makedirs(path)
    tensors = read_all(release[0])
    key = "layers.1.ffn.experts.2.w2.scale"
    tensors[key] = tensors[key][:, :0].contiguous()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(release[0], "config.json")) as f, open(os.path.join(path, "config.json"), "w") as g:
        g.write(f.read())
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key[:-len('scale')]}"
                                              rf"weight_scale_inv' is float8_e8m0fnu\[64, 0\], expected"):
        convert(path, str(tmp_path / "out"), progress=False)
    with pytest.raises(CheckpointError, match=r"w2.weight': scale shape \[64, 0\] does not match the FP4 weight"):
        dsj.load_pretrained(path, dtype=jnp.float32)
