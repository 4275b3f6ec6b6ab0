"""deepseek_jax.checkpoint.convert (convert/convert.py, export.py, orbax_io.py, torch_io.py, load.py): HF / PyTorch ->
Orbax -> HF, checked against transformers' logits and bit for bit against the source tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from convert_fixtures import TOKENS, make_fp8, make_hf, read_all, torch_logits

import deepseek_jax as dsj
from deepseek_jax.checkpoint.convert.convert import convert
from deepseek_jax.checkpoint.convert.export import export
from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.cli import main


def _logits(path, dtype=jnp.float32, **kw):
    config, params = load_pretrained(path, dtype=dtype, **kw)
    return config, params, np.asarray(dsj.Transformer(config).apply({"params": params}, jnp.asarray(TOKENS)))


def _same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), k


@pytest.fixture(scope="module")
def v3_fp32(tmp_path_factory):
    """transformers' tiny V3 (fp32) saved with the MTP layer in its own shard."""
    path = str(tmp_path_factory.mktemp("v3") / "hf")
    model = make_hf(path, dsj.presets["tiny-v3"], mtp=True)
    return path, torch_logits(model, TOKENS)


@pytest.fixture(scope="module")
def v3_converted(v3_fp32, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("v3c") / "orbax")
    convert(v3_fp32[0], dst, dtype="float32", progress=False)
    return dst


def test_v3_with_mtp_matches_transformers_and_hf_loader(v3_fp32, v3_converted):
    src, want = v3_fp32
    config, params, got = _logits(v3_converted)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert config.num_nextn_predict_layers == 1 and "mtp_0" in params
    # Every leaf, MTP module included, is bit-identical to what the in-memory HF loader reads.
    _, direct = load_pretrained(src)
    flat_a, tree_a = jax.tree.flatten(params)
    flat_b, tree_b = jax.tree.flatten(direct)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_v2_bf16_default_dtype(tmp_path):
    """V2 (no q_lora, softmax router), default --dtype bfloat16: leaves are the bf16 rounding of the source."""
    src, dst = str(tmp_path / "hf"), str(tmp_path / "orbax")
    model = make_hf(src, dsj.presets["tiny-v2"], mtp=False)
    assert main(["convert", src, dst, "--no-progress"]) == 0
    config, params = load_pretrained(dst)
    _, ref = load_pretrained(src)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        assert a.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16))
    _, _, got = _logits(dst)
    np.testing.assert_allclose(got, torch_logits(model, TOKENS), atol=5e-2, rtol=0)


def test_round_trip_fp32_bit_exact_and_transformers_loads_export(v3_fp32, v3_converted, tmp_path):
    src, want = v3_fp32
    out = str(tmp_path / "hf")
    assert main(["export", v3_converted, out, "--no-progress", "--max-shard-size", "100KB"]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    _same_tensors(read_all(out), read_all(src))  # MTP layer (and its embedding/head copies) included
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(model, TOKENS), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("source_dtype,convert_dtype", [(torch.bfloat16, "bfloat16"), (torch.float16, "float32")])
def test_round_trip_bf16_fp16_bit_exact(tmp_path, source_dtype, convert_dtype):
    """bf16 source through the default bf16 tree; fp16 through fp32 (lossless) and back to fp16, since
    export writes each tensor in its source dtype. The router's correction bias stays fp32 throughout."""
    src, dst, out = str(tmp_path / "hf"), str(tmp_path / "orbax"), str(tmp_path / "back")
    make_hf(src, dsj.presets["tiny-v3"], mtp=True, dtype=source_dtype)
    convert(src, dst, dtype=convert_dtype, progress=False)
    export(dst, out, progress=False)
    _same_tensors(read_all(out), read_all(src))


def test_pytorch_state_dict_sources(v3_fp32, v3_converted, tmp_path):
    """A ``.bin`` in a directory, a ``.pt`` file given by path (config via --config) and sharded ``.bin`` files
    with an index give the same leaves as the safetensors source."""
    src, _ = v3_fp32
    sd = read_all(src)
    d = tmp_path / "torchdir"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    with open(os.path.join(src, "config.json")) as f:
        (d / "config.json").write_text(f.read())
    torch.save(sd, tmp_path / "weights.pt")
    sharded = tmp_path / "sharded"  # pytorch_model.bin.index.json + two .bin shards
    sharded.mkdir()
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, sharded / name)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}))
    (sharded / "config.json").write_text((d / "config.json").read_text())
    _, ref = load_pretrained(v3_converted)
    for source, extra in ((str(d), []), (str(tmp_path / "weights.pt"), ["--config", str(d / "config.json")]),
                          (str(sharded), [])):
        dst = str(tmp_path / ("o" + os.path.basename(source)))
        assert main(["convert", source, dst, "--dtype", "float32", "--no-progress"] + extra) == 0
        _, params = load_pretrained(dst)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_release_layout_matches_transformers_on_dequantized(tmp_path, ue8m0):
    """Hand-made FP8 checkpoint (partial edge blocks, 3 shards): converted logits == transformers on the
    dequantized weights; --keep-fp8 keeps the bytes, and export --fp8 gives the release tensors back exactly."""
    src = str(tmp_path / "fp8")
    ref, tensors = make_fp8(src, ue8m0=ue8m0)
    if ue8m0:
        scales = [v for k, v in tensors.items() if k.endswith("_scale_inv")]
        assert all(torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5)) for s in scales)
    want = torch_logits(ref, TOKENS)
    dst = str(tmp_path / "deq")
    convert(src, dst, dtype="float32", progress=False)
    _, _, got = _logits(dst)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)

    kept = str(tmp_path / "kept")
    convert(src, kept, dtype="float32", keep_fp8=True, progress=False)
    _, params, got = _logits(kept)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    back = str(tmp_path / "back")
    assert main(["export", kept, back, "--fp8", "--no-progress"]) == 0
    _same_tensors(read_all(back), tensors)
    with open(os.path.join(back, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    assert q["weight_block_size"] == [128, 128] and (q.get("scale_fmt") == "ue8m0") == ue8m0


def test_export_fp8_requantizes(v3_converted, tmp_path):
    """export --fp8 from a bf16/fp32 tree: e4m3fn weights with block scales whose dequantization is within
    FP8 rounding of the weights, and the unquantized tensors of the release untouched."""
    from deepseek_jax.quant.blocks import dequantize_region

    out = str(tmp_path / "fp8")
    export(v3_converted, out, fp8=True, progress=False)
    with open(os.path.join(v3_converted, "deepseek_jax.json")) as f:
        got, orig = read_all(out), read_all(json.load(f)["source"])
    quantized = [k for k in got if got[k].dtype == torch.float8_e4m3fn]
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in quantized
    assert "model.layers.1.mlp.gate.weight" not in quantized and "lm_head.weight" not in quantized
    for k in quantized:
        w8 = got[k].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        deq = dequantize_region(w8, got[k + "_scale_inv"].numpy())
        w = orig[k].numpy()
        assert np.abs(deq - w).max() <= np.abs(w).max() / 16 + 1e-12, k  # e4m3: 3 mantissa bits
    assert torch.equal(got["lm_head.weight"], orig["lm_head.weight"])


def test_dry_run_lists_mapping_and_writes_nothing(v3_fp32, tmp_path, capsys):
    dst = tmp_path / "never"
    assert main(["convert", v3_fp32[0], str(dst), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "moe_layers/mlp/experts/gate_proj" in out and "2x16x64x32" in out
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in out
    assert not dst.exists() and os.listdir(tmp_path) == []


def test_progress_bar_and_verify(v3_fp32, tmp_path, capsys):
    dst = str(tmp_path / "o")
    assert main(["convert", v3_fp32[0], dst, "--dtype", "float32", "--verify"]) == 0
    cap = capsys.readouterr()
    assert "convert: 100%" in cap.err and "B/s" in cap.err
    line = [l for l in cap.out.splitlines() if l.startswith("verify:")][0]
    assert float(line.split("=")[-1]) < 1e-4


def test_restore_onto_mesh_reads_shards(v3_converted):
    """8 simulated CPU devices, mesh (fsdp=2, expert=2, tensor=2): params land sharded, equal to the source."""
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh
        import deepseek_jax as dsj
        mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2, 2), ("data", "fsdp", "expert", "tensor"))
        _, p = dsj.load_pretrained({v3_converted!r}, mesh=mesh)
        _, q = dsj.load_pretrained({v3_converted!r})
        e = p["moe_layers"]["mlp"]["experts"]["gate_proj"]
        assert e.sharding.spec[1] == "expert", e.sharding
        assert len(e.addressable_shards) == 8 and e.addressable_shards[0].data.shape[1] == 8
        # FSDP over the whole mesh: the vocab dim over tensor x fsdp x expert.
        assert p["embed_tokens"]["embedding"].sharding.spec[0] == ("tensor", "fsdp", "expert")
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
