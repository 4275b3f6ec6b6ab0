"""deepseek_jax.posttrain.lora, and LoRA in deepseek_jax.posttrain.distill / grpo (``distill --init-from S
--lora-rank R``, ``grpo --lora-rank R``): only the adapters train and are checkpointed (the base bit-identical, named
by ``lora_base``); the logged distillation KL, the held-out evaluation and the export are the adapted student's
(numpy merges of the checkpointed adapters as the reference); GRPO samples the adapted policy (the sampler's
log-probabilities equal the LoRA training forward's) and takes the frozen base as its KL reference."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from hf_reference import hf_model

import deepseek_jax as dsj
from deepseek_jax.cli import main
from deepseek_jax.training.optimizer import param_path

CONFIG = dsj.presets["tiny-v3-arith"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
DISTILL_STEPS, BATCH, SEQ = 4, 4, 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two random transformers checkpoints of ``CONFIG`` (sharper than the default init, so the two models' next
    tokens differ clearly): the student / policy base and the teacher."""
    root = tmp_path_factory.mktemp("lora_posttrain")
    out = {}
    for name, seed in (("base", 0), ("teacher", 1)):
        hf_model(CONFIG, seed=seed, bias_scale=0.05, init_std=0.1).save_pretrained(str(root / name))
        out[name] = str(root / name)
    out["root"] = root
    return out


# ----- numpy references ---------------------------------------------------------------------------------
def _flat(tree) -> dict:
    return {param_path(p): np.array(x, copy=True) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _leaves(tree) -> dict:
    """The leaves themselves (not copies), by path."""
    return {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tree(flat: dict) -> dict:
    out = {}
    for name, x in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = x
    return out


def _adapters_of(flat: dict, name: str):
    """The adapters of kernel ``name`` (a Linear's ``.../kernel`` has ``.../lora_a``, an expert stack ``gate_proj``
    has ``gate_proj_lora_a``), or None."""
    stem = name[:-len("/kernel")] if name.endswith("/kernel") else name
    for a, b in ((f"{stem}/lora_a", f"{stem}/lora_b"), (f"{stem}_lora_a", f"{stem}_lora_b")):
        if a in flat:
            return flat[a], flat[b]
    return None


def _numpy_merged(flat: dict, scale: float) -> dict:
    """``kernel + scale * a @ b`` (float64 products) for each adapted kernel; the adapters dropped."""
    out = {}
    for name, x in flat.items():
        if name.endswith(("lora_a", "lora_b")):
            continue
        ab = _adapters_of(flat, name)
        if ab is None:
            out[name] = x
            continue
        a, b = ab
        lead = a.ndim + b.ndim - 2 - x.ndim
        delta = np.matmul(a.reshape(a.shape[:lead] + (-1, a.shape[-1])).astype(np.float64),
                          b.reshape(b.shape[:lead + 1] + (-1,)).astype(np.float64))
        out[name] = (x + scale * delta.reshape(x.shape)).astype(x.dtype)
    return out


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _apply(options=None):
    model = dsj.Transformer(CONFIG, options or dsj.ModelOptions())
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def _logits(params, batch, options=None):
    """The model's logits (fp32; the plain model unless ``options`` say otherwise) on a batch's inputs, positions
    and segment ids."""
    return np.asarray(_apply(options)(params, batch["inputs"], batch["positions"], batch["segment_ids"]))


def _checkpoint(work: str, step: int) -> dict:
    """A LoRA work directory's checkpoint ``step``: base + adapters, not merged (flat, numpy)."""
    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.checkpoint.train_dir import load_train_checkpoint

    _, params = load_train_checkpoint(work, step=step, merge_lora=False, load_base=load_pretrained)
    return _flat(params)


def _check_only_adapters_moved(flat: dict, base: dict) -> None:
    adapters = {k for k in flat if k.endswith(("lora_a", "lora_b"))}
    assert adapters and set(flat) - adapters == set(base)
    for k, v in base.items():
        assert np.array_equal(flat[k], v), k  # the frozen base, bit for bit
    assert all(np.abs(flat[k]).max() > 0 for k in adapters if k.endswith("lora_b")), "B moved from zero"


def _check_export(work: str, out: str, flat: dict, base: dict) -> None:
    """``deepseek-jax export WORK OUT`` writes the numpy merge of the checkpoint: the targeted tensors merged (fp32
    rounding), every other tensor the base's, bit for bit."""
    assert main(["export", work, out, "--no-progress"]) == 0
    _, exported = dsj.load_pretrained(out)
    exported = _flat(exported)
    want = _numpy_merged(flat, SCALE)
    assert set(exported) == set(want)
    changed = 0
    for k, v in want.items():
        if _adapters_of(flat, k) is None:
            assert np.array_equal(exported[k], v), k
        else:
            np.testing.assert_allclose(exported[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
            changed += not np.array_equal(v, base[k])
    assert changed >= 5  # q_a, q_b, kv_a, kv_b, o and the experts' projections


# ----- distillation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill_run(checkpoints):
    """``deepseek-jax distill --teacher T --init-from BASE --lora-rank 4`` on the built-in arithmetic data, a
    checkpoint every step (the CLI then scores the held-out answers: ``heldout.json``)."""
    work = str(checkpoints["root"] / "distill")
    rc = main(["distill", "--teacher", checkpoints["teacher"], "--init-from", checkpoints["base"],
               "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--workdir", work,
               "--steps", str(DISTILL_STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--lr", "2e-2",
               "--warmup", "0", "--save-every", "1", "--keep", str(DISTILL_STEPS + 1)])
    assert rc == 0
    with open(os.path.join(work, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"work": work, "records": records}


@pytest.mark.slow  # the fixture compiles a distillation step (MoE teacher inside) and scores the held-out answers
def test_lora_distillation_trains_the_adapters_and_logs_the_adapted_students_kl(checkpoints, distill_run, tmp_path):
    """Each logged KL equals the forward KL (numpy, float64) between the teacher and the student merged in numpy
    from the checkpoint before that step, on the run's batch; the base stays bit-identical, the adapters move, and
    the checkpoints point at the base."""
    from deepseek_jax.data.packing import make_dataset

    work, records = distill_run["work"], distill_run["records"]
    assert [r["step"] for r in records] == list(range(1, DISTILL_STEPS + 1))
    with open(os.path.join(work, "train_config.json")) as f:
        assert json.load(f)["lora_base"] == os.path.abspath(checkpoints["base"])
    base = _flat(dsj.load_pretrained(checkpoints["base"])[1])
    _, teacher = dsj.load_pretrained(checkpoints["teacher"])
    data = make_dataset(None, seq_len=SEQ, batch_size=BATCH, seed=0, arithmetic_loss="answers")
    student = base
    for r in records:
        batch = next(data)
        log_p = _log_softmax(_logits(teacher, batch))
        log_q = _log_softmax(_logits(_tree(_numpy_merged(student, SCALE)), batch))
        mask = batch["loss_mask"]
        kl = float(((np.exp(log_p) * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum())
        assert r["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7), r["step"]
        if r["step"] > 1:  # the adapters matter: the base's own KL on this batch is another number
            base_kl = float(((np.exp(log_p) * (log_p - _log_softmax(_logits(_tree(base), batch)))).sum(-1)
                             * mask).sum() / mask.sum())
            assert abs(base_kl - kl) > 0.05, r["step"]  # measured: 0.14 at step 2, 0.24 at step 4
        student = _checkpoint(work, r["step"])
        _check_only_adapters_moved(student, base)
    assert records[-1]["kl"] < records[0]["kl"]
    _check_export(work, str(tmp_path / "exported"), student, base)


@pytest.mark.slow  # reads the distillation fixture's run; scores the held-out answers again
def test_lora_distillation_heldout_evaluation_sees_the_adapters(distill_run):
    """The CLI's held-out score (``heldout.json``) equals ``evaluate_arithmetic`` on the numpy merge of the final
    checkpoint's adapters into the base, and the work directory reads back as that merge."""
    from deepseek_jax.training.evaluate import evaluate_arithmetic

    work = distill_run["work"]
    merged = _numpy_merged(_checkpoint(work, DISTILL_STEPS), SCALE)
    _, read_back = dsj.load_pretrained(work)
    read_back = _flat(read_back)
    assert set(read_back) == set(merged)
    for k, v in merged.items():
        np.testing.assert_allclose(read_back[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    want = evaluate_arithmetic(CONFIG, _tree(merged))
    with open(os.path.join(work, "heldout.json")) as f:
        got = json.load(f)
    assert got["exact"] == want["exact"] and got["answers"] == want["answers"]
    assert got["samples"] == [list(s) for s in want["samples"]]


@pytest.mark.slow  # two more short LoRA distillation runs
def test_lora_distillation_resumes_from_its_adapters_bit_identically(checkpoints, distill_run, tmp_path):
    """Stopped after 2 of 4 steps and resumed (the checkpoint: adapters and their Adam moments; the base read again
    from init_from), the run logs the losses of the uninterrupted CLI run."""
    from deepseek_jax.posttrain.distill import DistillConfig, distill
    from deepseek_jax.training.config import TrainConfig

    tc = TrainConfig(steps=DISTILL_STEPS, batch_size=BATCH, seq_len=SEQ, learning_rate=2e-2, warmup_steps=0,
                     lora_rank=RANK, lora_alpha=ALPHA)
    kw = dict(teacher=checkpoints["teacher"], init_from=checkpoints["base"], progress=False, async_save=False,
              save_every=2)
    work = str(tmp_path / "resumed")
    first = distill(CONFIG, tc, DistillConfig(), work, stop_after=2, **kw)
    rest = distill(CONFIG, tc, DistillConfig(), work, **kw)
    assert [r["step"] for r in first + rest] == list(range(1, DISTILL_STEPS + 1))
    for key in ("kl", "loss", "grad_norm"):
        assert [r[key] for r in first + rest] == [r[key] for r in distill_run["records"]], key
    with pytest.raises(ValueError, match="LoRA fine-tunes a checkpoint: give init_from"):
        distill(CONFIG, tc, DistillConfig(), str(tmp_path / "no_base"), teacher=checkpoints["teacher"])


# ----- GRPO ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # compiles generate, the two log-probability forwards and a GRPO step
def test_grpo_lora_samples_the_adapted_policy_against_the_base_as_reference(checkpoints):
    """With random (non-zero) adapters: the sampler's params (merged) give the LoRA model's logits; the rollouts'
    log-probabilities equal the LoRA training forward's on the same samples; the update's reference
    log-probabilities are the base model's (numpy log-softmax of the plain model on the checkpoint); two updates
    move only the adapters."""
    from deepseek_jax.checkpoint.load import pretrained_config
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.posttrain.grpo import GRPOConfig, GRPOTrainer, samples_batch
    from deepseek_jax.posttrain.rewards import arithmetic_prompts, arithmetic_stop_ids
    from deepseek_jax.posttrain.rollouts import rollout
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.run import init_params, with_lora_base

    config = pretrained_config(checkpoints["base"])
    gc = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=3, iterations=2, beta=0.1)
    tc = with_lora_base(TrainConfig(seq_len=16, learning_rate=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                                    weight_decay=0.0, bias_update_rate=0.0, lora_rank=RANK, lora_alpha=ALPHA),
                        checkpoints["base"])
    trainer = GRPOTrainer(config, tc, make_mesh(None, jax.devices()[:1]), gc)
    base = _flat(dsj.load_pretrained(checkpoints["base"])[1])
    fresh = trainer.state_from_params(init_params(checkpoints["base"], trainer))["params"]
    rng = np.random.RandomState(0)
    adapted = {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) if k.endswith("lora_b") else v
               for k, v in _flat(fresh).items()}
    state = trainer.state_from_params(_tree(adapted))
    params = state["params"]

    # The sampler's params: the plain model's, only the targeted kernels new arrays; the LoRA model's logits.
    sampled = trainer.sampling_params(params)
    flat_sampled = _flat(sampled)
    assert set(flat_sampled) == set(base)
    shared = [k for k in base if _adapters_of(adapted, k) is None]
    before, after = (_leaves(t) for t in (params, sampled))
    assert shared and all(after[k] is before[k] for k in shared)  # not copied
    prompts, answers = arithmetic_prompts(3, gc.prompts_per_step)
    host = samples_batch(prompts, [[5, 6, 7]] * len(prompts), 16)
    lora_logits = _logits(params, host, trainer.model.options)
    np.testing.assert_allclose(_logits(sampled, host), lora_logits, rtol=1e-5, atol=1e-5)
    assert np.abs(_logits(_tree(base), host) - lora_logits).max() > 1e-2  # the adapters matter

    # The rollouts sample the adapted policy: their log-probabilities are the training forward's.
    ro = rollout(config, sampled, prompts, answers, group_size=gc.group_size, max_new_tokens=gc.max_new_tokens,
                 temperature=gc.temperature, seed=0, stop_ids=arithmetic_stop_ids())
    batch_host = samples_batch(ro["prompts"], ro["completions"], 16, ro["logprobs"])
    mask = batch_host["loss_mask"] > 0
    batch = trainer.put_batch({k: v for k, v in batch_host.items() if k in trainer.batch_keys} | {
        "advantages": np.zeros(gc.batch_size, np.float32), **{k: np.zeros((gc.batch_size, 16), np.float32)
                                                                for k in ("old_logp", "ref_logp", "tis_weight")}})
    policy_logp = np.asarray(trainer.token_logp(params, batch))
    np.testing.assert_allclose(policy_logp[mask], batch_host["sampler_logp"][mask], rtol=0, atol=1e-5)
    targets = batch_host["targets"][..., None]
    base_logp = np.take_along_axis(_log_softmax(_logits(_tree(base), batch_host) / gc.temperature), targets,
                                   -1)[..., 0]
    assert np.abs(base_logp - policy_logp)[mask].max() > 1e-2

    # The update: old log-probabilities the adapted policy's, the reference the base's; only the adapters move.
    seen = []
    run_step = trainer.run_step
    trainer.run_step = lambda s, b: (seen.append({k: np.array(b[k]) for k in ("old_logp", "ref_logp")}),
                                     run_step(s, b))[1]
    state, updates = trainer.update(state, ro, None)
    assert len(seen) == gc.iterations and len(updates) == gc.iterations
    np.testing.assert_allclose(seen[0]["old_logp"][mask], policy_logp[mask], rtol=0, atol=1e-6)
    np.testing.assert_allclose(seen[0]["ref_logp"][mask], base_logp[mask], rtol=0, atol=1e-5)
    assert updates[0]["kl"] > 1e-4  # k3 KL of the adapted policy to the base
    after = _flat(state["params"])
    for k, v in base.items():
        assert np.array_equal(after[k], v), k
    moved = [k for k in after if k.endswith("lora_b") and not np.array_equal(after[k], adapted[k])]
    assert moved and len(moved) == sum(k.endswith("lora_b") for k in after)


@pytest.mark.slow  # a short `deepseek-jax grpo --lora-rank` run: generate, the forwards and a GRPO step compile
def test_grpo_lora_run_checkpoints_adapters_and_exports_merged(checkpoints, tmp_path):
    """``grpo --init-from BASE --lora-rank 4``: every step's sampler agrees with the training forward (the sampler
    sees the adapters, which move from step 2 on), the held-out accuracy is logged, the checkpoint holds the
    adapters over a bit-identical base and points at it, and ``export`` writes their numpy merge."""
    work = str(tmp_path / "grpo")
    rc = main(["grpo", "--init-from", checkpoints["base"], "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
               "--workdir", work, "--steps", "3", "--group-size", "4", "--prompts-per-step", "2",
               "--max-new-tokens", "3", "--lr", "2e-2", "--warmup", "0", "--iterations", "2", "--beta", "0.1",
               "--eval-every", "2", "--eval-prompts", "8", "--save-every", "3"])
    assert rc == 0
    with open(os.path.join(work, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["sampler_logp_diff_max"] < 1e-4 for r in records), [r["sampler_logp_diff_max"] for r in records]
    assert records[-1]["kl"] > 0  # the policy moved away from its reference, the base
    assert all(r.get("heldout_accuracy") is not None for r in records[:2])
    with open(os.path.join(work, "train_config.json")) as f:
        assert json.load(f)["lora_base"] == os.path.abspath(checkpoints["base"])
    base = _flat(dsj.load_pretrained(checkpoints["base"])[1])
    flat = _checkpoint(work, 3)
    _check_only_adapters_moved(flat, base)
    _check_export(work, str(tmp_path / "exported"), flat, base)
    assert main(["grpo", "--preset", "tiny-v3-arith", "--lora-rank", "4", "--workdir", str(tmp_path / "x")]) == 2


def test_merged_shares_the_untargeted_leaves_and_folds_the_adapters():
    """``posttrain.lora.merged`` equals the numpy merge, keeps every untargeted leaf as the same array, and
    ``with_lora_base`` points a LoRA run at its base (absolute) or refuses one without it."""
    from deepseek_jax.config.options import LoraOptions, ModelOptions
    from deepseek_jax.models.transformer import abstract_params
    from deepseek_jax.posttrain.lora import merged
    from deepseek_jax.training.config import TrainConfig
    from deepseek_jax.training.run import with_lora_base

    shapes = nn.meta.unbox(abstract_params(CONFIG, ModelOptions(lora=LoraOptions(RANK, ALPHA))))
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda x: jax.numpy.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
    out = merged(params, SCALE)
    flat, want = _flat(params), _numpy_merged(_flat(params), SCALE)
    got, lookup = _leaves(out), _leaves(params)
    assert set(got) == set(want)
    for k, v in want.items():
        if _adapters_of(flat, k) is None:
            assert got[k] is lookup[k], k
        else:
            np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert with_lora_base(TrainConfig(lora_rank=2), "ckpt").lora_base == os.path.abspath("ckpt")
    assert with_lora_base(TrainConfig(), None).lora_base is None
    with pytest.raises(ValueError, match="LoRA fine-tunes a checkpoint"):
        with_lora_base(TrainConfig(lora_rank=2), None)


SHARDED_SCRIPT = r"""
import dataclasses, json, jax, numpy as np
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.posttrain.grpo import GRPOConfig, GRPOTrainer
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.optimizer import param_path
from deepseek_jax.training.trainer import Trainer

config = dsj.presets["tiny-v3-arith"].replace(num_hidden_layers=2, num_nextn_predict_layers=0)
gc = GRPOConfig(group_size=4, prompts_per_step=4, beta=0.1, iterations=2)
tc = TrainConfig(seq_len=16, learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, bias_update_rate=0.0,
                 lora_rank=4, lora_alpha=8.0)
one = jax.devices()[:1]
rng = np.random.RandomState(0)
samples = {"prompts": [[1] + rng.randint(3, 18, rng.randint(3, 7)).tolist() for _ in range(16)],
           "completions": [rng.randint(3, 18, rng.randint(1, 6)).tolist() for _ in range(16)],
           "rewards": rng.randint(0, 2, 16).astype(np.float32)}
base = Trainer(config, dataclasses.replace(tc, lora_rank=0), make_mesh(None, one)).init_state()["params"]
fresh = GRPOTrainer(config, tc, make_mesh(None, one), gc).state_from_params(jax.tree.map(np.asarray, base))
start = jax.tree_util.tree_map_with_path(
    lambda p, x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32) if param_path(p).endswith("lora_b")
    else np.array(x), fresh["params"])
runs = {}
for name, mesh in (("one", make_mesh(None, one)), ("sharded", make_mesh("data=2,fsdp=2,expert=2"))):
    tr = GRPOTrainer(config, tc, mesh, gc)
    state = tr.state_from_params(jax.tree.map(np.array, start))
    merged = jax.tree.map(np.array, tr.sampling_params(state["params"]))
    state, updates = tr.update(state, samples, None)
    runs[name] = (merged, jax.tree.map(np.array, state["params"]), updates)
max_diff = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
(m1, p1, u1), (m8, p8, u8) = runs["one"], runs["sharded"]
print("RESULT " + json.dumps({"merged_diff": max_diff(m1, m8), "params_diff": max_diff(p1, p8),
                              "loss": [[u["loss"] for u in u1], [u["loss"] for u in u8]],
                              "kl": [[u["kl"] for u in u1], [u["kl"] for u in u8]]}))
"""


@pytest.mark.slow  # one subprocess on 8 simulated devices, two GRPO trainers: ~2 min on 2 cores
def test_grpo_lora_update_on_8_devices_equals_one_device():
    """The LoRA GRPO update (the adapted policy's and the base reference's log-probabilities, two steps) and the
    sampler's merged params on ``data=2,fsdp=2,expert=2`` equal one device's."""
    from train_helpers import run_on_8_devices

    out = run_on_8_devices(SHARDED_SCRIPT)
    assert out["merged_diff"] < 1e-6
    np.testing.assert_allclose(out["loss"][1], out["loss"][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["kl"][1], out["kl"][0], rtol=1e-4, atol=1e-8)
    assert out["kl"][0][0] > 1e-4  # the random adapters: the policy is away from the base reference
    assert out["params_diff"] < 1e-4  # Adam's normalized steps amplify last-bit gradient differences
