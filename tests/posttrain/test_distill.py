"""deepseek_jax.posttrain (distillation KLs) and deepseek_jax.posttrain.distill / distill_cli: closed forms, vocab checks."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.cli import main as cli_main
from deepseek_jax.posttrain import kl as losses
from deepseek_jax.posttrain.distill import DistillConfig, check_vocab

# Two tokens over a vocabulary of 4, by hand.
TEACHER_LOGITS = np.array([[[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, -2.0]]], np.float64)
STUDENT_LOGITS = np.array([[[0.0, 1.0, 0.5, 0.0], [1.0, -1.0, 2.0, 0.0]]], np.float64)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_values_and_gradients_equal_closed_forms(temperature):
    p, q = _softmax(TEACHER_LOGITS / temperature), _softmax(STUDENT_LOGITS / temperature)
    forward = (p * np.log(p / q)).sum(-1)
    reverse = (q * np.log(q / p)).sum(-1)
    f, r = losses.kl_divergences(jnp.asarray(STUDENT_LOGITS, jnp.float32), jnp.asarray(TEACHER_LOGITS, jnp.float32),
                                 temperature)
    np.testing.assert_allclose(np.asarray(f), forward, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r), reverse, rtol=1e-5)
    # Summed loss T^2 ((1-m) F + m R); its gradient in the student's logits has a closed form:
    # d T^2 KL(p||q) / dz = T (q - p);  d T^2 KL(q||p) / dz = T q (log q - log p - KL(q||p)).
    mask = jnp.ones((1, 2))
    for mix in (0.0, 1.0, 0.3):
        def loss(z):
            fw, rv = losses.kl_divergences(z, jnp.asarray(TEACHER_LOGITS, jnp.float32), temperature)
            return losses.distillation_kl(fw, rv, mask, mix, temperature)[0]

        z = jnp.asarray(STUDENT_LOGITS, jnp.float32)
        expected_value = temperature**2 * ((1 - mix) * forward + mix * reverse).sum()
        assert float(loss(z)) == pytest.approx(expected_value, rel=1e-5)
        grad_f = temperature * (q - p)
        grad_r = temperature * q * (np.log(q) - np.log(p) - reverse[..., None])
        np.testing.assert_allclose(np.asarray(jax.grad(loss)(z)), (1 - mix) * grad_f + mix * grad_r, atol=1e-6)


def test_topk_kl_equals_the_kl_of_the_coarsened_distributions():
    """k = 2 of 4: outcomes {top1, top2, rest}, by hand; k = vocab: the full KL."""
    p, q = _softmax(TEACHER_LOGITS), _softmax(STUDENT_LOGITS)
    logp, ids = losses.teacher_topk(jnp.asarray(TEACHER_LOGITS, jnp.float32), 2)
    np.testing.assert_array_equal(np.asarray(ids), [[[0, 1], [2, 0]]])
    f, r = losses.topk_kl(jnp.asarray(STUDENT_LOGITS, jnp.float32), logp, ids)
    for t, top in enumerate(([0, 1], [2, 0])):
        pc = np.array([*p[0, t, top], 1 - p[0, t, top].sum()])
        qc = np.array([*q[0, t, top], 1 - q[0, t, top].sum()])
        assert float(f[0, t]) == pytest.approx((pc * np.log(pc / qc)).sum(), rel=1e-5)
        assert float(r[0, t]) == pytest.approx((qc * np.log(qc / pc)).sum(), rel=1e-5)
    # Coarsening never raises a KL: top-k is a lower bound of the full one.
    full_f, full_r = losses.kl_divergences(jnp.asarray(STUDENT_LOGITS, jnp.float32),
                                           jnp.asarray(TEACHER_LOGITS, jnp.float32))
    assert np.all(np.asarray(f) <= np.asarray(full_f) + 1e-7) and np.all(np.asarray(r) <= np.asarray(full_r) + 1e-7)
    logp4, ids4 = losses.teacher_topk(jnp.asarray(TEACHER_LOGITS, jnp.float32), 4, temperature=1.5)
    f4, r4 = losses.topk_kl(jnp.asarray(STUDENT_LOGITS, jnp.float32), logp4, ids4, temperature=1.5)
    ff, fr = losses.kl_divergences(jnp.asarray(STUDENT_LOGITS, jnp.float32), jnp.asarray(TEACHER_LOGITS, jnp.float32),
                                   1.5)
    np.testing.assert_allclose(np.asarray(f4), np.asarray(ff), atol=2e-5)
    np.testing.assert_allclose(np.asarray(r4), np.asarray(fr), atol=2e-5)
    # The gradient of the top-k forward KL: for each top id T(q_i - p_i) (tail included via its ids).
    grad = jax.grad(lambda z: losses.distillation_kl(*losses.topk_kl(z, logp4, ids4, 1.5), jnp.ones((1, 2)), 0.0,
                                                     1.5)[0])(jnp.asarray(STUDENT_LOGITS, jnp.float32))
    pt, qt = _softmax(TEACHER_LOGITS / 1.5), _softmax(STUDENT_LOGITS / 1.5)
    np.testing.assert_allclose(np.asarray(grad), 1.5 * (qt - pt), atol=2e-5)


def test_distillation_kl_counts_only_masked_tokens():
    f = jnp.asarray([[1.0, 2.0, 4.0]])
    r = jnp.asarray([[8.0, 16.0, 32.0]])
    total, n = losses.distillation_kl(f, r, jnp.asarray([[1.0, 0.0, 1.0]]), 0.25, 2.0)
    assert float(n) == 2
    assert float(total) == pytest.approx(4 * (0.75 * (1 + 4) + 0.25 * (8 + 32)))


def test_config_validation():
    with pytest.raises(ValueError, match="mix"):
        DistillConfig(mix=1.5)
    with pytest.raises(ValueError, match="not both 0"):
        DistillConfig(kl_weight=0.0, ce_weight=0.0)


def test_vocab_mismatch_names_both_sizes_and_models(tmp_path, capsys):
    teacher = dsj.presets["tiny-v3-arith"]
    student = dsj.presets["tiny-qwen2"]
    with pytest.raises(ValueError, match=r"teacher runs/t has vocab_size 32, the student tiny-qwen2 has vocab_size 512"):
        check_vocab(teacher, student, "runs/t", "tiny-qwen2")
    # The CLI refuses before reading a weight, exit code 2: a train work directory's config is enough to check.
    wd = tmp_path / "teacher"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps(teacher.to_hf_dict()))
    (wd / "train_config.json").write_text("{}")
    code = cli_main(["distill", "--teacher", str(wd), "--student", "tiny-qwen2", "--workdir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2
    assert "vocab_size 32" in err and "vocab_size 512" in err and str(wd) in err and "tiny-qwen2" in err
    assert not os.path.exists(tmp_path / "s")  # nothing written


def test_a_student_equal_to_its_teacher_has_zero_kl_on_packed_rows():
    """The teacher in the step sees the student's inputs, positions and segment ids, and its logits at position t
    are compared with the student's at t: a student with the teacher's own config and params has KL 0 (and CE
    equal to the teacher's) on packed multi-document rows, while the teacher's logits one position off give a
    KL well above 0 (what a misalignment would look like)."""
    from deepseek_jax.data.packing import make_dataset
    from deepseek_jax.parallel.mesh import make_mesh, mesh_context
    from deepseek_jax.posttrain.distill import DistillTrainer
    from deepseek_jax.training.config import TrainConfig

    config = dsj.presets["tiny-v3-arith"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    tc = TrainConfig(steps=1, batch_size=4, seq_len=64, mtp_weight=0.0, seed=0)
    mesh = make_mesh(None, jax.devices()[:1])
    trainer = DistillTrainer(config, tc, mesh, DistillConfig(temperature=2.0), teacher_config=config)
    params = trainer.init_state()["params"]
    batch = trainer.put_batch(next(make_dataset(None, seq_len=64, batch_size=4, seed=3, arithmetic_loss="answers")))
    assert int(np.asarray(batch["segment_ids"]).max()) > 1  # several documents per row
    with mesh_context(mesh, trainer.rules):
        targets = trainer._teacher_targets(params, batch)
        _, (parts, _) = trainer._loss(params, {**batch, **targets})
        shifted = {"teacher_logits": jnp.roll(targets["teacher_logits"], 1, axis=1)}
        _, (off, _) = trainer._loss(params, {**batch, **shifted})
    assert float(parts["tokens"]) > 20
    assert abs(float(parts["kl"])) < 1e-5 and abs(float(parts["reverse_kl"])) < 1e-5
    assert float(off["kl"]) > 1e-3  # measured 0.021 (a random init is near uniform; aligned: < 1e-5)


def test_the_teacher_runs_at_its_own_precision_in_the_step_and_precomputed(tmp_path):
    """A bf16 student's in-step teacher and the precomputed shards give the same top-k (both at the teacher's
    precision, fp32 by default); in the step it used to run at the student's bf16."""
    from deepseek_jax.data.packing import make_dataset
    from deepseek_jax.models.transformer import Transformer
    from deepseek_jax.parallel.mesh import make_mesh, mesh_context
    from deepseek_jax.posttrain.distill import DistillTrainer
    from deepseek_jax.posttrain.teacher import precompute_teacher
    from deepseek_jax.training.config import TrainConfig

    config = dsj.presets["tiny-v3-arith"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    tc = TrainConfig(steps=1, batch_size=4, seq_len=32, mtp_weight=0.0, seed=0, precision="bf16")
    mesh = make_mesh(None, jax.devices()[:1])
    data = lambda: make_dataset(None, seq_len=32, batch_size=4, seed=3)  # noqa: E731
    params = Transformer(config).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    precompute_teacher(config, params, data(), 1, str(tmp_path / "shards"), top_k=4, progress=False, mesh=mesh)
    shard = np.load(tmp_path / "shards" / "shard_00000.npz")
    got = {}
    for precision in ("fp32", "bf16"):
        dc = DistillConfig(top_k=4, teacher_precision=precision)
        trainer = DistillTrainer(config, tc, mesh, dc, teacher_config=config)
        assert trainer.model.options.dtype == "bfloat16"  # the student's
        batch = trainer.put_batch(next(data()))
        with mesh_context(mesh, trainer.rules):
            got[precision] = np.asarray(trainer._teacher_targets(trainer.put_teacher(params), batch)["teacher_logp"])
    np.testing.assert_allclose(got["fp32"], shard["teacher_logp"][0], atol=1e-5)
    assert np.abs(got["bf16"] - shard["teacher_logp"][0]).max() > 1e-3  # bf16 really differs
    with pytest.raises(ValueError, match="teacher_precision"):
        DistillConfig(teacher_precision="fp16")
