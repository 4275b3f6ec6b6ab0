"""deepseek_jax.training / losses / optimizer / sharding: the train step against references."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import CONFIG, TRAIN, batch

import deepseek_jax as dsj
from deepseek_jax.moe.router import select_experts
from deepseek_jax.parallel.mesh import make_mesh, parse_mesh_spec
from deepseek_jax.training import losses
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.trainer import Trainer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the helpers


# ----- losses against their formulas --------------------------------------------------------------
def test_balance_loss_matches_formula():
    """Sequence-wise (V3): per document of a packed row, f_i = E/(K T_d) count_i and P_i = mean_t s'_i, averaged
    over the documents (the MoE's ``document_balance``); expert-level (V2): over the whole batch."""
    from deepseek_jax.moe.layer import document_balance

    rng = np.random.RandomState(0)
    c = CONFIG
    layers, b, t, e, k = 2, 3, 12, c.n_routed_experts, c.num_experts_per_tok
    segments = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [0] * 5, [2] * 6 + [1] * 4 + [0] * 2])
    chosen = np.zeros((layers, b, t, e))
    normed = np.zeros((layers, b, t, e))
    for layer in range(layers):
        for r in range(b):
            for i in range(t):
                if segments[r, i]:  # each document prefers its own experts: balanced per row, not per document
                    pool = (np.arange(k + 1) + (k + 1) * (segments[r, i] - 1)) % e
                    chosen[layer, r, i, rng.choice(pool, k, replace=False)] = 1
                    p = rng.uniform(size=e) * np.isin(np.arange(e), pool)
                    normed[layer, r, i] = p / p.sum()
    per_layer = [document_balance(jnp.asarray(chosen[l], jnp.float32), jnp.asarray(normed[l], jnp.float32),
                                  jnp.asarray(segments), k) for l in range(layers)]
    stats = {"counts": jnp.asarray(chosen.sum(2)), "scores": jnp.asarray(normed.sum(2)),
             "doc_balance": jnp.stack([x[0] for x in per_layer]), "documents": jnp.stack([x[1] for x in per_layer])}
    docs = [(r, d) for r in range(b) for d in np.unique(segments[r]) if d > 0]
    assert np.asarray(stats["documents"]).tolist() == [[3, 1, 2]] * layers

    def by_hand(l, rows_as_documents=False):
        out = []
        for r, d in docs if not rows_as_documents else [(r, None) for r in range(b)]:
            sel = segments[r] > 0 if d is None else segments[r] == d
            n = sel.sum()
            out.append(np.sum(e / (k * n) * chosen[l, r, sel].sum(0) * normed[l, r, sel].sum(0) / n))
        return np.mean(out)

    expected = sum(by_hand(l) for l in range(layers))
    got = losses.balance_loss(stats, c, 0.5, sequence_wise=True)
    assert float(got) == pytest.approx(0.5 * expected, rel=1e-5)
    rows_only = sum(by_hand(l, rows_as_documents=True) for l in range(layers))  # the old rule: one row, one sequence
    assert abs(rows_only - expected) > 0.05 * expected
    # Expert-level (V2): the same over the whole batch.
    tot = (segments > 0).sum()
    expected = sum(np.sum(e / (k * tot) * chosen[l].sum((0, 1)) * normed[l].sum((0, 1)) / tot) for l in range(layers))
    assert float(losses.balance_loss(stats, c, 0.5, sequence_wise=False)) == pytest.approx(0.5 * expected, rel=1e-5)
    # Perfect balance gives alpha * 1 per layer (f_i = 1, sum P_i = 1).
    flat = document_balance(jnp.full((1, 4, e), k / e), jnp.full((1, 4, e), 1.0 / e), jnp.ones((1, 4), jnp.int32), k)
    stats = {"doc_balance": flat[0][None], "documents": flat[1][None]}
    assert float(losses.balance_loss(stats, c, 1.0, True)) == pytest.approx(1.0)
    # The global batch's normalizer counts documents, as the statistics do.
    norm = losses.loss_normalizers({"loss_mask": segments > 0, "segment_ids": jnp.asarray(segments),
                                    "targets": jnp.zeros((b, t), jnp.int32)}, 0)
    assert float(norm["sequences"]) == len(docs) == 6


def test_cross_entropy_and_mtp_targets():
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    s, n = losses.cross_entropy(logits, jnp.asarray([[0, 1]]), jnp.asarray([[1.0, 1.0]]))
    assert float(s) == pytest.approx(-np.log(0.5) - np.log(0.8), rel=1e-6) and float(n) == 2
    targets = jnp.asarray([[1, 2, 3, 4, 5]])
    seg = jnp.asarray([[1, 1, 1, 2, 2]])
    tk, mk = losses.mtp_targets(targets, jnp.ones((1, 5)), seg, 1)
    np.testing.assert_array_equal(np.asarray(tk), [[2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(mk), [[1, 1, 0, 1]])  # position 2 -> 3 crosses documents


def test_bias_update_moves_a_skewed_router_toward_balance():
    """The aux-loss-free rule alone (no gradients) evens out a router that prefers a few experts."""
    c = CONFIG
    rng = np.random.RandomState(0)
    e = c.n_routed_experts
    skew = np.linspace(0.0, 0.3, e)  # later experts systematically preferred
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(0, 0.1, (512, e)) + skew))
    bias = jnp.zeros((e,))

    def imbalance(bias):
        _, idx = select_experts(scores, bias, c)
        load = np.bincount(np.asarray(idx).ravel(), minlength=e)
        return load.max() / load.mean(), load

    start, _ = imbalance(bias)
    for _ in range(300):
        _, load = imbalance(bias)
        bias = losses.update_correction_bias(bias, jnp.asarray(load), 0.002)
    end, _ = imbalance(bias)
    assert start > 2.5 and end < 1.3, (start, end)


# ----- the step -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_and_state():
    trainer = Trainer(CONFIG, TRAIN, make_mesh(None))
    return trainer, trainer.init_state()


def test_step_updates_bias_by_the_rule_and_freezes_it_for_the_optimizer(trainer_and_state):
    trainer, state = trainer_and_state
    b = trainer.put_batch(batch(0))
    params = jax.tree.map(np.asarray, state["params"])
    _, aux = trainer.model.apply({"params": state["params"]}, b["inputs"], b["positions"], b["segment_ids"],
                                 return_router_stats=True, return_mtp=True)
    load = np.asarray(aux["router_stats"]["counts"]).sum(1)[0]
    mtp_load = np.asarray(aux["mtp_router_stats"]["counts"]).sum(1)[0]
    new_state, metrics = trainer.step_fn(state)(jax.tree.map(jnp.copy, state), b)
    new_bias = np.asarray(new_state["params"]["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][0])
    old_bias = params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"][0]
    np.testing.assert_allclose(new_bias - old_bias, -0.01 * np.sign(load - load.mean()), atol=1e-7)
    mtp_bias = np.asarray(new_state["params"]["mtp_0"]["block"]["mlp"]["gate"]["e_score_correction_bias"])
    np.testing.assert_allclose(mtp_bias - params["mtp_0"]["block"]["mlp"]["gate"]["e_score_correction_bias"],
                               -0.01 * np.sign(mtp_load - mtp_load.mean()), atol=1e-7)
    assert float(metrics["balance_loss"]) > 0 and float(metrics["mtp_loss"]) > 0
    # Throughput counts real tokens: the batch's padding (row 2 from position 12) is not one.
    assert float(metrics["input_tokens"]) == float((batch(0)["segment_ids"] > 0).sum()) == 8 * 16 - 4
    np.testing.assert_allclose(np.asarray(metrics["expert_load_max_over_mean"]), [load.max() / load.mean()], rtol=1e-5)


def _fd_check(loss_fn, params, direction_for, trials=3, eps=1e-2):
    loss = jax.jit(loss_fn)
    grads = jax.jit(jax.grad(loss_fn))(params)
    rng = np.random.RandomState(0)
    for trial in range(trials):
        # Perturb each chosen weight on its own scale (0.02, the init std), so eps is a small relative change.
        direction = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(0.02 * rng.normal(size=x.shape), x.dtype) if direction_for(path)
            else jnp.zeros_like(x), params)
        plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
        minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
        fd = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        assert analytic == pytest.approx(fd, rel=1e-2, abs=1e-4), (trial, analytic, fd)


def _names(path):
    return [str(getattr(k, "key", k)) for k in path]


def test_gradients_match_finite_differences_dense():
    """Every parameter of a model with no routers (dense layers, dense MTP block): CE + MTP + z-loss."""
    config = CONFIG.replace(n_routed_experts=0, first_k_dense_replace=CONFIG.num_hidden_layers)
    trainer = Trainer(config, TRAIN, make_mesh(None))
    params = trainer.init_state()["params"]
    b = trainer.put_batch(batch(1))
    _fd_check(lambda p: trainer._loss(p, b)[0], params, lambda path: True)


def test_gradients_match_finite_differences_moe(trainer_and_state):
    """Through the sparse MoE dispatch and the balance loss. Routing is piecewise constant, so the direction
    moves the MoE layer's expert weights only (downstream of its router, upstream of no other router)."""
    trainer = Trainer(CONFIG, TrainConfig(**{**TRAIN.__dict__, "mtp_weight": 0.0}), make_mesh(None))
    params = trainer_and_state[1]["params"]
    b = trainer.put_batch(batch(1))
    _fd_check(lambda p: trainer._loss(p, b)[0], params,
              lambda path: _names(path)[0] == "moe_layers" and ("experts" in _names(path)))


def test_grad_accumulation_equals_one_big_batch(trainer_and_state):
    """Packed, unevenly padded micro-batches: every loss term divides by the global batch's counts, so the
    accumulated loss and gradient are the big batch's (averaging micro-batch means would weight each micro-batch's
    tokens by 1 / its own count)."""
    trainer, state = trainer_and_state
    accum = Trainer(CONFIG, TrainConfig(**{**TRAIN.__dict__, "grad_accum": 2}), make_mesh(None))
    uneven = batch(2)  # rows 1 and 2 packed / padded (see train_helpers)
    for row in (0, 3):  # more padding in the first micro-batch: it counts far fewer tokens than the second
        uneven["segment_ids"][row, 5:] = 0
        uneven["positions"][row, 5:] = 0
        uneven["loss_mask"][row, 4:] = 0.0
    first, second = (float(uneven["loss_mask"][i * 4:(i + 1) * 4].sum()) for i in range(2))
    assert first < 0.75 * second
    b = trainer.put_batch(uneven)
    g1, (p1, c1) = jax.jit(trainer._grads)(state["params"], b)
    g2, (p2, c2) = jax.jit(accum._grads)(state["params"], b)
    np.testing.assert_allclose(np.asarray(c1["moe"]), np.asarray(c2["moe"]))
    for name in ("loss", "mtp_loss", "balance_loss", "z_loss", "total_loss", "tokens", "input_tokens"):
        assert float(p1[name]) == pytest.approx(float(p2[name]), rel=1e-5), name
    for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-7)


def test_balance_alpha_default_and_override():
    """noaux_tc models default to the V3 paper's 0.0001, not config.json's aux_loss_alpha (0.001 in the V3
    release, a field V3's own code never reads); V2 routers use their aux_loss_alpha; an explicit value wins."""
    v3 = dsj.ModelConfig.from_pretrained(os.path.join(HERE, "fixtures", "deepseek-v3.config.json"))
    assert v3.aux_loss_alpha == 0.001
    assert TrainConfig().balance_alpha_for(v3) == 1e-4
    assert TrainConfig().balance_alpha_for(dsj.presets["deepseek-v2-lite"]) == 0.001
    assert TrainConfig().balance_alpha_for(dsj.presets["deepseek-v2"]) == 0.003
    assert TrainConfig(balance_alpha=0.02).balance_alpha_for(v3) == 0.02
    assert Trainer(CONFIG, TrainConfig(), make_mesh(None)).alpha == 1e-4


def test_non_finite_step_is_skipped_and_counted(trainer_and_state):
    """A step whose loss is NaN (here: a NaN in the loss mask) changes nothing, not even the correction bias,
    and says so in its metrics; the next good step trains as usual."""
    trainer, state = trainer_and_state
    before = jax.tree.map(np.asarray, state)
    poisoned = batch(0)
    poisoned["loss_mask"][0, 3] = np.nan
    step = trainer.step_fn(state)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), trainer.put_batch(poisoned))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["total_loss"]))
    for key in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(new_state[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert int(new_state["step"]) == int(before["step"]) + 1
    new_state, metrics = step(new_state, trainer.put_batch(batch(0)))
    assert float(metrics["skipped"]) == 0.0
    # The good step after the skipped one does exactly what it does on a fresh state (which moves the bias).
    fresh, _ = step(jax.tree.map(jnp.array, before), trainer.put_batch(batch(0)))
    for key in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(new_state[key]), jax.tree.leaves(fresh[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bias = lambda p: np.asarray(p["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"])  # noqa: E731
    assert not np.array_equal(bias(new_state["params"]), bias(before["params"]))


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run(tmp_path, monkeypatch):
    put = Trainer.put_batch

    def poisoned(self, local):
        local = dict(local, loss_mask=np.full_like(local["loss_mask"], np.nan))
        return put(self, local)

    from deepseek_jax.training.run import fit

    tc = TrainConfig(**{**TRAIN.__dict__, "steps": 6, "max_bad_steps": 2})
    monkeypatch.setattr(Trainer, "put_batch", poisoned)
    with pytest.raises(FloatingPointError, match="2 steps in a row had a non-finite loss"):
        fit(CONFIG, tc, str(tmp_path), save_every=1, progress=False, async_save=False)
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(l)["skipped"] for l in f] == [1.0, 1.0]


def test_peak_flops_table():
    from deepseek_jax.training.metrics import peak_flops

    for kind, want in [("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
                       ("TPU v6 lite", 918e12), ("TPU v4", 275e12), ("NVIDIA H100 80GB HBM3", 989e12),
                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("cpu", None), ("Tesla T4", None)]:
        assert peak_flops(kind) == want, kind


def test_step_flops_count_each_document_s_own_causal_context(trainer_and_state):
    """MFU's FLOPs: the step's real tokens and the keys they attend (within their document, causally), not a
    T / 2 context for every row; a distillation step adds its teacher's forward."""
    from deepseek_jax.models.counts import active_params

    trainer, state = trainer_and_state
    b = batch(0)
    seg = np.asarray(b["segment_ids"])
    docs = [int((seg[r] == s).sum()) for r in range(seg.shape[0]) for s in np.unique(seg[r]) if s > 0]
    assert len(docs) > seg.shape[0]  # packed rows
    keys = sum(n * (n + 1) // 2 for n in docs)
    _, metrics = trainer.step_fn(state)(jax.tree.map(jnp.copy, state), trainer.put_batch(b))
    assert float(metrics["input_tokens"]) == sum(docs) == (seg > 0).sum()
    assert float(metrics["attended_keys"]) == keys
    c = CONFIG
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    per_key = 3 * 2 * layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    want = 6 * active_params(c, True) * sum(docs) + per_key * keys
    assert trainer.step_flops(sum(docs), keys) == pytest.approx(want, rel=1e-12)
    assert keys < sum(docs) * (seg.shape[1] + 1) / 2  # shorter than whole-row documents

    from deepseek_jax.posttrain.distill import DistillConfig, DistillTrainer

    student = CONFIG.replace(num_hidden_layers=1, num_nextn_predict_layers=0)
    tc = TrainConfig(steps=1, batch_size=4, seq_len=64, mtp_weight=0.0)
    with_teacher = DistillTrainer(student, tc, make_mesh(None), DistillConfig(), teacher_config=CONFIG)
    alone = DistillTrainer(student, tc, make_mesh(None), DistillConfig(top_k=4))  # precomputed: no teacher
    teacher = 2 * active_params(CONFIG, False) * 10 + per_key / 3 * c.num_hidden_layers / layers * 55
    assert with_teacher.step_flops(10, 55) - alone.step_flops(10, 55) == pytest.approx(teacher, rel=1e-12)


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,fsdp=2,expert=2", 8) == {"data": 2, "fsdp": 2, "expert": 2, "context": 1,
                                                            "tensor": 1}
    assert parse_mesh_spec("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "expert": 1, "context": 1, "tensor": 2}
    assert parse_mesh_spec("context=-1", 8) == {"data": 1, "fsdp": 1, "expert": 1, "context": 8, "tensor": 1}
    assert parse_mesh_spec(None, 4) == {"data": 4, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices, but there are 8"):
        parse_mesh_spec("data=4", 8)
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh_spec("model=2", 2)


def _subprocess_env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    return env


SPECS = ["data=8", "expert=8", "data=2,expert=4", "data=2,fsdp=2,expert=2", "fsdp=2,expert=2,tensor=2"]
SHARDED_SCRIPT = r"""
import json, sys, numpy as np, jax
from train_helpers import run_steps
SPECS = """ + repr(SPECS) + r"""
out = {}
ref_losses, ref_params, _ = run_steps(None, devices=jax.devices()[:1])
out["ref"] = ref_losses
for spec in SPECS:
    losses, params, state = run_steps(spec)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    kernel = state["params"]["moe_layers"]["mlp"]["experts"]["gate_proj"]
    mu = state["opt_state"][1].mu["moe_layers"]["mlp"]["experts"]["gate_proj"]
    out[spec] = {"losses": losses, "max_param_diff": diff, "expert_spec": list(kernel.sharding.spec),
                 "mu_spec": list(mu.sharding.spec), "n_shards": len(kernel.addressable_shards)}
print("RESULT " + json.dumps(out))
"""


def _run_json(script: str, env: dict, timeout: int = 900) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_sharded_step_on_8_devices_matches_one_device():
    """Every mesh runs the expert-parallel MoE (all-to-all over `expert` where it is > 1) and equals one device."""
    out = _run_json(SHARDED_SCRIPT, _subprocess_env(8))
    for spec in SPECS:
        r = out[spec]
        np.testing.assert_allclose(r["losses"], out["ref"], rtol=1e-5, err_msg=spec)
        assert r["max_param_diff"] < 1e-5, (spec, r["max_param_diff"])
    # The rules really shard: experts over `expert`, the model dim over `fsdp`, the expert width over `tensor`,
    # and the Adam moments like their params.
    r = out["fsdp=2,expert=2,tensor=2"]
    assert r["expert_spec"] == [None, "expert", "fsdp", "tensor"] and r["mu_spec"] == r["expert_spec"]
    assert r["n_shards"] == 8


TWO_PROCESS_SCRIPT = r"""
import json, os, sys
from deepseek_jax.parallel.mesh import initialize_distributed
initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.training.trainer import Trainer
from train_helpers import CONFIG, TRAIN, run_grain_steps, run_steps
assert jax.device_count() == 8 and jax.local_device_count() == 4
if jax.process_index() == 1:  # one process reaches its first step 40 s late: gloo alone would give up after 30 s
    import time
    step_fn = Trainer.step_fn
    def late_step_fn(self, state, _late=[True]):
        if _late:
            time.sleep(40)
            _late.clear()
        return step_fn(self, state)
    Trainer.step_fn = late_step_fn
out = {}
for spec in SPECS:
    out[spec] = {"losses": run_steps(spec)[0], "rows": Trainer(CONFIG, TRAIN, make_mesh(spec)).process_rows(),
                 "grain": run_grain_steps(spec, None)}
print("RESULT " + json.dumps(out))
"""
# data x fsdp x expert: each process holds whole rows (its half of the batch). context=8: the sequence is split
# over both processes, each feeds every row and its devices take their slices of the tokens (issue 23.9).
TWO_PROCESS_SPECS = ["data=2,fsdp=2,expert=2", "context=8"]
# What each process reads from the Grain pipeline, by the shard rule (stream.py): its own half of the rows (shards
# 0 and 1 of 2), or, the context axis spanning them, both the whole batch (shard 0 of 1).
GRAIN_BLOCKS = {"data=2,fsdp=2,expert=2": [(0, 4), (4, 8)], "context=8": [(0, 8)]}


@pytest.mark.slow
def test_two_processes_match_one():
    """Two processes of 4 devices each against one of 8, on a mesh whose batch axes span the processes and on
    one whose context axis does: the same losses, on fixed batches and on the Grain pipeline's (each process reading
    its shard: its own rows, or on the context axis both the same); one process starts its first step 40 s late."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _subprocess_env(4)
    script = TWO_PROCESS_SCRIPT.replace("SPECS", repr(TWO_PROCESS_SPECS), 1)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{port}", str(i)], env=env,
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    multi = [json.loads([l for l in o.splitlines() if l.startswith("RESULT ")][-1][7:]) for o, _ in outs]
    single = _run_json("import json\nfrom train_helpers import run_grain_steps, run_steps\n"
                       f"print('RESULT ' + json.dumps({{s: (run_steps(s)[0], run_grain_steps(s, b)) "
                       f"for s, b in {GRAIN_BLOCKS!r}.items()}}))", _subprocess_env(8))
    assert [m["data=2,fsdp=2,expert=2"]["rows"] for m in multi] == [[0, 4], [4, 8]]
    assert [m["context=8"]["rows"] for m in multi] == [[0, 8], [0, 8]]
    for spec in TWO_PROCESS_SPECS:
        fixed, grain = single[spec]
        for m in multi:
            np.testing.assert_allclose(m[spec]["losses"], fixed, rtol=1e-5)
            np.testing.assert_allclose(m[spec]["grain"], grain, rtol=1e-5)
    assert single["data=2,fsdp=2,expert=2"][1] != single["context=8"][1]  # two shards' rows, not one's


# ----- checkpoints and resume -------------------------------------------------------------------------
def _train_cmd(workdir, steps, extra=()):
    return [sys.executable, "-m", "deepseek_jax.cli", "train", "--workdir", str(workdir), "--steps", str(steps),
            "--batch-size", "8", "--seq-len", "32", "--save-every", "3", "--set", "num_hidden_layers=2",
            "--warmup", "2", *extra]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    env = _subprocess_env(1)
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, 12), env=env, check=True, capture_output=True, timeout=900)
    reference = _losses(full)
    assert reference[12] < reference[1] - 0.5, "the built-in data is learned"

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, 12), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline:  # kill it mid-run, after a checkpoint
        if (killed / "metrics.jsonl").exists() and len(_losses(killed)) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # It was killed mid-run: on a machine fast enough to finish first, this test would test nothing.
    killed_at = max(_losses(killed))
    assert killed_at < 12, f"the run had finished (step {killed_at}) before it was killed"
    resumed_from = max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    # A half-written checkpoint (what a crash mid-save leaves) must not be taken as the latest.
    partial = killed / "checkpoints" / "11.orbax-checkpoint-tmp-1700000000"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("partial")
    subprocess.run(_train_cmd(killed, 12), env=env, check=True, capture_output=True, timeout=900)
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [reference[s] for s in range(1, 13)],
                               rtol=1e-6)
    assert (killed / "loss.png").exists() and any((killed / "tb").iterdir())
    # Throughput leaves out the first step of each process (it compiles).
    with open(killed / "metrics.jsonl") as f:
        rates = {r["step"]: r["tokens_per_s"] for r in map(json.loads, f)}
    firsts = {1, resumed_from + 1}  # the history was cut back to the checkpoint it resumed from
    assert all((rates[s] is None) == (s in firsts) for s in rates), (rates, resumed_from)

    # The work directory is a checkpoint like any other: load_pretrained reads its latest step, and
    # `deepseek-jax generate` prompts it through the tokenizer.json the trainer wrote.
    config, params = dsj.load_pretrained(killed)
    assert config.num_hidden_layers == 2 and config.eos_token_id == 2
    expected = jax.eval_shape(lambda: dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, jax.tree.map(
        lambda b: b.value if hasattr(b, "value") else b, expected["params"], is_leaf=lambda b: hasattr(b, "value")))
    gen = subprocess.run([sys.executable, "-m", "deepseek_jax.cli", "generate", "--checkpoint", str(killed),
                          "--prompt", "12+7=", "--max-new-tokens", "4"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert gen.returncode == 0 and str(killed / "tokenizer.json") in gen.stdout + gen.stderr, gen.stderr[-2000:]


def test_learning_rate_schedule_by_hand():
    """Warmup from 0, the peak after it, cosine decay to lr * min_ratio; with no warmup the first step takes lr."""
    import math

    from deepseek_jax.training.optimizer import learning_rate_schedule

    s = learning_rate_schedule(1e-3, 10, 110, 0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4) and float(s(10)) == pytest.approx(1e-3)
    mid = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 50 / 100))
    assert float(s(60)) == pytest.approx(mid, rel=1e-5) and float(s(110)) == pytest.approx(1e-4, rel=1e-5)
    s0 = learning_rate_schedule(1e-3, 0, 100, 1.0)
    assert float(s0(0)) == pytest.approx(1e-3) and float(s0(99)) == pytest.approx(1e-3)
