"""deepseek_jax.checkpoint.convert on bad input: one ``error:`` line naming the file (and tensor), exit status 1, and
nothing left behind in the output's directory (no DST, no temp dir); Ctrl-C likewise (status 130)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from convert_fixtures import make_hf
from safetensors import safe_open
from safetensors.torch import save_file

import deepseek_jax as dsj
from deepseek_jax.cli import main

INDEX = "model.safetensors.index.json"
KEY = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("base") / "hf")
    make_hf(path, dsj.presets["tiny-v3"], mtp=True)
    return path


@pytest.fixture
def src(base, tmp_path):
    p = str(tmp_path / "src")
    shutil.copytree(base, p)
    return p


def file_of(src: str, key: str) -> str:
    with open(os.path.join(src, INDEX)) as f:
        return os.path.join(src, json.load(f)["weight_map"][key])


def rewrite(path: str, change) -> None:
    """Load a shard, let ``change(dict)`` edit it, save it back."""
    with safe_open(path, "pt") as f:
        d = {k: f.get_tensor(k) for k in f.keys()}
    change(d)
    save_file(d, path, metadata={"format": "pt"})


def run_convert(src, tmp_path, capsys, *extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc = main(["convert", src, str(out / "dst"), "--no-progress", *extra])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("WARNING:absl")]
    assert os.listdir(out) == [], "output left behind"
    return rc, err


def expect_error(src, tmp_path, capsys, *needles, extra=()):
    rc, err = run_convert(src, tmp_path, capsys, *extra)
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_truncated_shard(src, tmp_path, capsys):
    f = file_of(src, KEY)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    expect_error(src, tmp_path, capsys, os.path.basename(f), "truncated")


def test_header_json_corrupt(src, tmp_path, capsys):
    f = file_of(src, KEY)
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"#")
    expect_error(src, tmp_path, capsys, os.path.basename(f), "not valid JSON")


def test_header_lies_about_offsets(src, tmp_path, capsys):
    f = file_of(src, KEY)
    raw = open(f, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start, end = header[KEY]["data_offsets"]
    header[KEY]["data_offsets"] = [start, end + 64]
    new = json.dumps(header).encode()
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    expect_error(src, tmp_path, capsys, os.path.basename(f), KEY, "offsets")


def test_tensor_missing(src, tmp_path, capsys):
    f = file_of(src, KEY)
    rewrite(f, lambda d: d.pop(KEY))
    index = json.load(open(os.path.join(src, INDEX)))
    del index["weight_map"][KEY]
    json.dump(index, open(os.path.join(src, INDEX), "w"))
    expect_error(src, tmp_path, capsys, src, KEY, "missing")


def test_tensor_extra(src, tmp_path, capsys):
    f = file_of(src, KEY)
    extra = "model.layers.1.self_attn.k_proj.weight"
    rewrite(f, lambda d: d.__setitem__(extra, torch.zeros(4, 4)))
    index = json.load(open(os.path.join(src, INDEX)))
    index["weight_map"][extra] = os.path.basename(f)
    json.dump(index, open(os.path.join(src, INDEX), "w"))
    expect_error(src, tmp_path, capsys, os.path.basename(f), extra, "unexpected")


def test_shape_not_matching_config(src, tmp_path, capsys):
    f = file_of(src, KEY)
    rewrite(f, lambda d: d.__setitem__(KEY, d[KEY][:, :-1].contiguous()))
    expect_error(src, tmp_path, capsys, os.path.basename(f), KEY, "shape [128, 31]", "expected [128, 32]")


def test_dtype_not_a_float(src, tmp_path, capsys):
    f = file_of(src, KEY)
    rewrite(f, lambda d: d.__setitem__(KEY, d[KEY].to(torch.int32)))
    expect_error(src, tmp_path, capsys, os.path.basename(f), KEY, "dtype int32")


def test_fp8_without_scale(src, tmp_path, capsys):
    f = file_of(src, KEY)
    rewrite(f, lambda d: d.__setitem__(KEY, d[KEY].to(torch.float8_e4m3fn)))
    expect_error(src, tmp_path, capsys, os.path.basename(f), KEY, "_scale_inv")


def test_index_names_missing_file(src, tmp_path, capsys):
    f = file_of(src, KEY)
    os.remove(f)
    expect_error(src, tmp_path, capsys, INDEX, os.path.basename(f), "does not exist")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_weights(src, tmp_path, capsys, bad):
    key = "model.layers.2.mlp.experts.7.down_proj.weight"  # late in the stream: output was being written
    f = file_of(src, key)

    def poison(d):
        d[key] = d[key].clone()
        d[key][3, 5] = bad

    rewrite(f, poison)
    expect_error(src, tmp_path, capsys, os.path.basename(f), key, "NaN or Inf")


def test_pickle_with_more_than_a_state_dict(base, tmp_path, capsys):
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(os.path.join(base, "config.json"), d / "config.json")
    # A class instance inside: torch.load(weights_only=True) refuses to unpickle it (no code runs).
    torch.save({"model.norm.weight": torch.ones(64), "trainer": _Payload()}, d / "pytorch_model.bin")
    expect_error(str(d), tmp_path, capsys, "pytorch_model.bin", "refused")


def test_pickle_nested_dict_is_not_a_state_dict(base, tmp_path, capsys):
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(os.path.join(base, "config.json"), d / "config.json")
    torch.save({"model": {"model.norm.weight": torch.ones(64)}, "step": 3}, d / "model.pt")
    expect_error(str(d), tmp_path, capsys, "model.pt", "'model'", "not a plain state dict")


def test_unsupported_architecture(src, tmp_path, capsys):
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    expect_error(src, tmp_path, capsys, "config.json", "unsupported architecture", "mistral")


def test_ctrl_c_leaves_nothing(src, tmp_path, capsys, monkeypatch):
    import deepseek_jax.checkpoint.convert.convert as conv

    real, calls = conv.iter_leaves, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 40:  # mid-stream, with part of the output already written
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "iter_leaves", interrupted)
    rc, err = run_convert(src, tmp_path, capsys)
    assert rc == 130 and calls["n"] >= 40
    assert err == ["interrupted"]


class _Payload:
    pass


def test_real_sigint_mid_conversion(tmp_path):
    """SIGINT to a running ``deepseek-jax convert`` once its temp output directory exists (conversion under
    way, seconds before the final rename): status 130, one line, and no output or temp directory left."""
    import importlib.util
    import signal
    import subprocess
    import sys
    import time

    spec = importlib.util.spec_from_file_location(
        "convert_memory", os.path.join(os.path.dirname(__file__), "..", "..", "bench", "convert_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    src = str(tmp_path / "wide")
    bench.write_synthetic(src, bench.wide_config(2))  # ~0.4 GB: a few seconds of converting
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "deepseek_jax.cli", "convert", src, str(out / "dst"), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if os.listdir(out):
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert [l for l in err.splitlines() if l.strip()] == ["interrupted"]
    assert os.listdir(out) == []


def test_force_keeps_the_old_output_until_the_new_one_is_in_place(base, tmp_path, monkeypatch, capsys):
    """``--force`` over an existing output: if putting the new output in place fails, the old one is still
    there, whole; when it succeeds, the new output replaces it and nothing else is left beside it."""
    import deepseek_jax.checkpoint.convert.convert as conv

    out = tmp_path / "out"
    out.mkdir()
    dst = str(out / "dst")
    assert main(["convert", base, dst, "--no-progress"]) == 0
    before = sorted(os.listdir(dst))
    marker = os.path.join(dst, "old-output-marker")
    open(marker, "w").close()

    real_rename = os.rename

    def failing_rename(a, b):
        if os.path.basename(str(a)).startswith(".dst.tmp-") and not str(a).endswith(".replaced") and str(b) == dst:
            raise OSError("disk full (injected)")
        return real_rename(a, b)

    monkeypatch.setattr(conv.os, "rename", failing_rename)
    assert main(["convert", base, dst, "--no-progress", "--force"]) == 1
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(out) == ["dst"] and os.path.exists(marker)
    config, params = dsj.load_pretrained(dst)  # still a whole, loadable checkpoint
    assert config.num_hidden_layers == dsj.presets["tiny-v3"].num_hidden_layers

    monkeypatch.setattr(conv.os, "rename", real_rename)
    assert main(["convert", base, dst, "--no-progress", "--force"]) == 0
    assert os.listdir(out) == ["dst"] and not os.path.exists(marker)
    assert sorted(os.listdir(dst)) == before
    dsj.load_pretrained(dst)
