"""bench/gpu_suite.py: its --smoke run (the GPU suite's code paths at tiny shapes, on this CPU) completes with
every section free of errors, every parity check within its stated tolerance, finite positive throughput
figures, and a decode byte count that matches one worked out by hand from the model's shapes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("peaks", "parity", "dispatch", "decode", "train", "torch")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "smoke.json"
    proc = subprocess.run([sys.executable, os.path.join("bench", "gpu_suite.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _checks(tree, path=""):
    if isinstance(tree, dict):
        if {"error", "tolerance", "pass"} <= set(tree):
            yield path, tree
            return
        for k, v in tree.items():
            yield from _checks(v, f"{path}/{k}")


def _results(report, section):
    return report["sections"][section]["results"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_section_ran_without_errors(report):
    assert report["suite"]["finished"] and "watchdog" not in report["suite"]
    for name in SECTIONS:
        sec = report["sections"][name]
        assert sec["status"] == "ok", (name, sec["errors"])
        assert not sec["errors"], (name, sec["errors"])
        # Only tokamax (not installed for the CPU tests) may skip; nothing skips for time in the smoke plan.
        assert all("tokamax" in why for why in sec["skipped"].values()), (name, sec["skipped"])
    assert not [row for row in report["summary"] if row[3] == "ERROR"]


@pytest.mark.slow
def test_parity_checks_pass_within_their_tolerances(report):
    parity = _results(report, "parity")
    assert set(parity) == {"attention_cudnn", "fp8_dots", "grouped_gemm", "absorbed_decode"}
    checks = dict(_checks(parity))
    for path, c in checks.items():
        assert math.isfinite(c["error"]) and c["error"] <= c["tolerance"] and c["pass"], (path, c)
    # The tolerances recorded are the suite's stated ones, per dtype.
    tol = report["tolerances"]
    assert checks["/attention_cudnn/unpacked/values"]["tolerance"] == tol["attention_bf16"]["values"]
    assert checks["/absorbed_decode/float32/decode_positions"]["tolerance"] == tol["decode_float32"]["logits"]
    assert checks["/absorbed_decode/bfloat16/decode_positions"]["tolerance"] == tol["decode_bfloat16"]["logits"]
    # Each path the smoke run can take was compared: values and gradients where the suite promises them.
    for key in ("attention_cudnn/unpacked/values", "attention_cudnn/unpacked/grads", "attention_cudnn/packed/grads",
                "fp8_dots/values", "fp8_dots/grads", "grouped_gemm/blocked/values", "grouped_gemm/blocked/grads",
                "grouped_gemm/ragged/grads", "grouped_gemm/gather/values", "absorbed_decode/bfloat16/prefill_positions"):
        assert "/" + key in checks, key
    assert parity["attention_cudnn"]["implementation"].startswith("xla")  # no GPU here: XLA's form of the call


@pytest.mark.slow
def test_throughput_figures_are_positive_and_finite(report):
    peaks = _results(report, "peaks")
    assert _positive(peaks["matmul_bf16"]["tflops"]) and _positive(peaks["copy"]["gb_per_s"])
    dispatch = _results(report, "dispatch")
    for path in ("blocked", "ragged", "dense_equivalent"):
        for mode in ("forward", "forward_backward"):
            assert _positive(dispatch[f"{mode}/128/{path}"]["tflops"]), (mode, path)
    decode = {k: v for k, v in _results(report, "decode").items() if k.startswith("batch")}
    assert set(decode) == {"batch1_slots128", "batch4_slots128"}
    for v in decode.values():
        assert _positive(v["tokens_per_s"]) and _positive(v["achieved_gb_s"])
        assert _positive(v["fraction_of_copy_bandwidth"])
    assert decode["batch1_slots128"]["moe_impl"] == "gather" and decode["batch4_slots128"]["moe_impl"] == "blocked"
    train = _results(report, "train")
    for name in ("bf16_remat-none", "fp8_remat-none"):
        r = train[name]
        assert _positive(r["tokens_per_s"]) and _positive(r["mfu_datasheet"]) and _positive(r["mfu_measured_peak"])
        assert math.isfinite(r["loss_last_step"])
    torch_side = _results(report, "torch")
    for name in ("prefill", "generate_batch2", "train_step"):
        r = torch_side[name]
        assert _positive(r["ours_tokens_per_s"]) and _positive(r["theirs_tokens_per_s"]) and _positive(r["ratio"])


def _hand_count_params(m: dict) -> dict:
    """The smoke model's parameters from its shapes (docs/reference.md's MLA and DeepSeekMoE layouts), by what a
    decode step reads: routed experts (each), the embedding table, and everything else."""
    d, h = m["hidden"], m["heads"]
    qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
    attn = (d * m["q_lora_rank"] + m["q_lora_rank"] + m["q_lora_rank"] * h * qk  # q_a, q_a_layernorm, q_b
            + d * (m["kv_lora_rank"] + m["qk_rope_head_dim"]) + m["kv_lora_rank"]  # kv_a_proj_with_mqa, its norm
            + m["kv_lora_rank"] * h * (m["qk_nope_head_dim"] + m["v_head_dim"])  # kv_b
            + h * m["v_head_dim"] * d  # o_proj
            + 2 * d)  # input / post-attention norms
    moe_layers = m["layers"] - m["dense_layers"]
    dense_mlp = 3 * d * m["dense_intermediate"]
    shared = 3 * d * m["shared_experts"] * m["expert_width"]
    router = d * m["routed_experts"]  # kernel (the fp32 correction bias is counted in bytes below)
    other = m["layers"] * attn + m["dense_layers"] * dense_mlp + moe_layers * (shared + router) + d + d * m["vocab"]
    return {"other": other, "expert": 3 * d * m["expert_width"], "embedding_row": d, "moe_layers": moe_layers}


@pytest.mark.slow
def test_decode_byte_count_matches_a_hand_count(report):
    decode = _results(report, "decode")
    m = decode["setup"]["model"]
    n = _hand_count_params(m)
    e, k = m["routed_experts"], m["top_k"]
    bf16, fp32 = 2, 4
    # All params are bf16 in the decode section except the router's correction bias (fp32, E per MoE layer).
    other_bytes = n["other"] * bf16 + n["moe_layers"] * e * fp32
    assert decode["setup"]["weights"]["other"] == other_bytes
    assert decode["setup"]["weights"]["expert_bytes"] == n["expert"] * bf16
    for key, v in decode.items():
        if not key.startswith("batch"):
            continue
        b, slots = v["batch"], v["cache_slots"]
        active = e * (1 - (1 - k / e) ** b)  # distinct experts chosen by b tokens, uniform routing
        if b == 1:
            assert active == pytest.approx(k)
        weights = other_bytes + b * n["embedding_row"] * bf16 + n["moe_layers"] * active * n["expert"] * bf16
        cache = b * slots * m["layers"] * (m["kv_lora_rank"] + m["qk_rope_head_dim"]) * bf16
        got = v["bytes_per_step"]
        assert got["cache"] == cache, key
        assert got["weights"] == pytest.approx(weights, abs=1), key
        assert got["total"] == got["weights"] + got["cache"]
        assert v["achieved_gb_s"] == pytest.approx(got["total"] / v["median_s"] / 1e9, rel=1e-9)
