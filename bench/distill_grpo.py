"""End to end on the built-in arithmetic task: train a tiny-v3 teacher, raise its held-out accuracy with GRPO,
distill it into a dense student of about half its size, and compare with the same student trained from scratch
for the same steps (as many as the teacher trained); then GRPO rollout throughput (absorbed decode, plain vs MTP
speculation).

    python bench/distill_grpo.py --workdir /tmp/distill_grpo      # ~45 CPU-minutes on 2 idle cores

Stages (``--only``): teacher, grpo, kd (forward KL on the teacher's top-1 id and one bucket for the rest, the
default student), kdfull (forward KL over the full vocabulary), scratch, speed; kdce (KL + CE) and seq
(sequence level) run only when named. Each stage writes a work directory under ``--workdir`` and is skipped when
that directory already holds its final checkpoint (rerun after a crash or to redo one stage after deleting its
directory). Results go to ``WORKDIR/results.json`` and the figure to ``--figure`` (default
``docs/distill_grpo.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.checkpoint.train_dir import load_train_checkpoint
from deepseek_jax.data.tasks.arithmetic import BOS_ID, EOS_ID
from deepseek_jax.posttrain.distill import DistillConfig, distill
from deepseek_jax.posttrain.grpo import GRPOConfig, grpo
from deepseek_jax.posttrain.rollouts import evaluate_accuracy, heldout_arithmetic
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.evaluate import evaluate_arithmetic
from deepseek_jax.training.loop import _read_history
from deepseek_jax.training.run import fit

TEACHER = dsj.presets["tiny-v3-arith"].replace(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
# A dense Qwen2-style student (GQA, q/k/v biases, no MoE, no MTP): 201,792 parameters, 45% of the teacher's
# 445,016 (its MTP module included; 66% of its main model's 306,880).
STUDENT = dsj.presets["tiny-qwen2"].replace(vocab_size=TEACHER.vocab_size, hidden_size=64, intermediate_size=192,
                                            num_hidden_layers=4, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def done(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "checkpoints", str(steps))
    return os.path.isdir(path)


def scores(workdir: str, heldout) -> dict:
    config, params = load_train_checkpoint(workdir)
    return {"heldout_exact": evaluate_accuracy(config, params, *heldout),
            "evaluate_arithmetic": evaluate_arithmetic(config, params)["exact"]}


def rollout_throughput(workdir: str, repeats: int = 5) -> dict:
    """Samples/s of GRPO's rollout (16 prompts x G=8, up to 5 new tokens, temperature 1), compile excluded."""
    from deepseek_jax.posttrain.rewards import arithmetic_prompts, arithmetic_stop_ids
    from deepseek_jax.posttrain.rollouts import rollout

    config, params = load_train_checkpoint(workdir)
    ids, answers = arithmetic_prompts(7, 16, stream=1)
    out = {}
    for name, spec in (("absorbed", False), ("absorbed+MTP", True)):
        kw = dict(group_size=8, max_new_tokens=5, temperature=1.0, stop_ids=arithmetic_stop_ids(), speculative=spec)
        rollout(config, params, ids, answers, seed=0, **kw)  # compile
        runs = [rollout(config, params, ids, answers, seed=1 + r, **kw) for r in range(repeats)]
        n = sum(len(r["completions"]) for r in runs)
        out[name] = {"samples_per_s": n / sum(r["seconds"] for r in runs),
                     "tokens_per_sample": float(np.mean([len(c) for r in runs for c in r["completions"]])),
                     "acceptance_rate": float(np.mean([r["stats"].get("acceptance_rate", np.nan) for r in runs]))}
    return out


def figure(root: str, path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    rows = _read_history(os.path.join(results["teacher_dir"], "metrics.jsonl"))
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    axes[0].set(title="teacher (tiny-v3) training: answer CE", xlabel="step", yscale="log")
    rows = _read_history(os.path.join(results["grpo_dir"], "metrics.jsonl"))
    axes[1].plot([r["step"] for r in rows], [r["accuracy"] for r in rows], lw=0.8, alpha=0.6,
                 label="sampled accuracy (T=1)")
    held = [(r["step"], r["heldout_accuracy"]) for r in rows if r.get("heldout_accuracy") is not None]
    axes[1].plot(*zip(*held), "o-", ms=3, label="held-out accuracy (greedy)")
    axes[1].set(title="GRPO on the teacher", xlabel="GRPO step")
    axes[1].legend(fontsize=8)
    for name, label in (("student_scratch", "student from scratch"), ("student_kd", "student, forward KL (top-1)"),
                        ("student_kdfull", "student, forward KL (full vocabulary)"),
                        ("student_kdce", "student, forward KL + CE"),
                        ("student_seq", "student, sequence-level")):
        rows = _read_history(os.path.join(root, name, "metrics.jsonl"))
        if rows:
            axes[2].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=label)
    axes[2].set(title="dense student (45% of the size): answer CE", xlabel="step", yscale="log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/distill_grpo")
    p.add_argument("--figure", default=os.path.join(os.path.dirname(__file__), "..", "docs", "distill_grpo.png"))
    p.add_argument("--teacher-steps", type=int, default=1200)
    p.add_argument("--teacher-dir", default=None,
                   help="use this train work directory as the teacher (it must hold a --teacher-steps checkpoint; the "
                        "main job, `deepseek-jax train`, now trains 3000 steps at lr 3e-3, not this teacher's 1200 "
                        "at 1e-2) instead of training one")
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--grpo-lr", type=float, default=3e-5)
    p.add_argument("--grpo-dir", default="grpo", help="the GRPO stage's directory under --workdir")
    p.add_argument("--grpo-filter-groups", type=int, default=1,
                   help="1: DAPO's dynamic sampling (train only on groups whose rewards differ), 0: off")
    p.add_argument("--grpo-temperature", type=float, default=1.0)
    p.add_argument("--grpo-group-size", type=int, default=8)
    p.add_argument("--grpo-prompts", type=int, default=64, help="prompts (groups) per GRPO step")
    p.add_argument("--student-steps", type=int, default=1200, help="the students' steps (the teacher's 1200)")
    p.add_argument("--distill-from", choices=("teacher", "grpo"), default="teacher",
                   help="the students' teacher: the trained tiny-v3, or it after GRPO")
    p.add_argument("--grpo-bias-update-rate", type=float, default=0.0,
                   help="the MoE balancing bias update during GRPO (0: the router moves only by the gradient)")
    p.add_argument("--kd-top-k", type=int, default=1,
                   help="the KL students' top-k (0: the full vocabulary; k: the teacher's top k ids and a bucket)")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-mix", type=float, default=0.0, help="0: forward KL, 1: reverse KL")
    p.add_argument("--heldout", type=int, default=2048, help="held-out questions of the final scores")
    p.add_argument("--grpo-eval", type=int, default=512, help="held-out questions of GRPO's curve (every 10 steps)")
    p.add_argument("--only", default="teacher,grpo,kd,kdfull,scratch,speed",
                   help="comma-separated stages to run (teacher,grpo,kd,kdfull,kdce,seq,scratch,speed)")
    args = p.parse_args(argv)
    root = args.workdir
    only = set(args.only.split(","))
    run = lambda stage: stage in only  # noqa: E731
    heldout = heldout_arithmetic(args.heldout)
    results_path = os.path.join(root, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    os.makedirs(root, exist_ok=True)
    timings = results.setdefault("seconds", {})

    def stage(name, fn):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        print(f"[{name}] {timings[name]:.0f} s", file=sys.stderr)

    student_tc = TrainConfig(steps=args.student_steps, batch_size=16, seq_len=128, learning_rate=1e-2,
                             warmup_steps=20, seed=0)
    teacher_dir = args.teacher_dir or os.path.join(root, "teacher")
    if run("teacher") and not args.teacher_dir and not done(teacher_dir, args.teacher_steps):
        tc = TrainConfig(steps=args.teacher_steps, batch_size=16, seq_len=128, learning_rate=1e-2, warmup_steps=20)
        os.makedirs(teacher_dir, exist_ok=True)
        json.dump(TEACHER.to_hf_dict(), open(os.path.join(teacher_dir, "config.json"), "w"))
        json.dump(tc.__dict__ | {"train_only": [], "freeze": []}, open(os.path.join(teacher_dir, "train_config.json"), "w"))
        stage("teacher", lambda: fit(TEACHER, tc, teacher_dir, arithmetic_loss="answers", save_every=args.teacher_steps))
    if run("teacher"):
        results["teacher"] = scores(teacher_dir, heldout)
        print("teacher", results["teacher"], file=sys.stderr)

    grpo_dir = os.path.join(root, args.grpo_dir)
    if run("grpo") and not done(grpo_dir, args.grpo_steps):
        gc = GRPOConfig(group_size=args.grpo_group_size, prompts_per_step=args.grpo_prompts, iterations=2, beta=0.04,
                        clip_eps=0.2, temperature=args.grpo_temperature, eval_every=10, eval_prompts=args.grpo_eval,
                        filter_groups=bool(args.grpo_filter_groups), max_sample_rounds=4)
        tc = TrainConfig(steps=args.grpo_steps, learning_rate=args.grpo_lr, warmup_steps=5, min_lr_ratio=1.0,
                         weight_decay=0.0, bias_update_rate=args.grpo_bias_update_rate)
        stage("grpo", lambda: grpo(gc, tc, grpo_dir, init_from=teacher_dir, save_every=args.grpo_steps))
    if run("grpo"):
        results["teacher_after_grpo"] = scores(grpo_dir, heldout)
        rows = _read_history(os.path.join(grpo_dir, "metrics.jsonl"))
        results["grpo_curve"] = [(r["step"], r["heldout_accuracy"]) for r in rows if "heldout_accuracy" in r]
        print("after GRPO", results["teacher_after_grpo"], file=sys.stderr)

    kd = dict(mix=args.kd_mix, temperature=args.kd_temperature, top_k=args.kd_top_k)
    for name, kwargs in (("kd", dict(dc=DistillConfig(**kd))),
                         ("kdfull", dict(dc=DistillConfig(**{**kd, "top_k": 0}))),
                         ("kdce", dict(dc=DistillConfig(**kd, kl_weight=1.0, ce_weight=1.0))),
                         ("seq", dict(dc=DistillConfig(kl_weight=0.0, ce_weight=1.0), sequence_prompts=20000))):
        d = os.path.join(root, f"student_{name}")
        if run(name) and not done(d, args.student_steps):
            source = grpo_dir if args.distill_from == "grpo" else teacher_dir
            stage(f"student_{name}", lambda: distill(STUDENT, student_tc, kwargs["dc"], d, teacher=source,
                                                     sequence_prompts=kwargs.get("sequence_prompts", 0),
                                                     save_every=args.student_steps))
        if run(name):
            results[f"student_{name}"] = scores(d, heldout)
            print(name, results[f"student_{name}"], file=sys.stderr)
    scratch_dir = os.path.join(root, "student_scratch")
    if run("scratch") and not done(scratch_dir, args.student_steps):
        os.makedirs(scratch_dir, exist_ok=True)
        json.dump(STUDENT.to_hf_dict(), open(os.path.join(scratch_dir, "config.json"), "w"))
        json.dump(student_tc.__dict__ | {"train_only": [], "freeze": []},
                  open(os.path.join(scratch_dir, "train_config.json"), "w"))
        stage("student_scratch", lambda: fit(STUDENT, student_tc, scratch_dir, arithmetic_loss="answers",
                                             save_every=args.student_steps))
    if run("scratch"):
        results["student_scratch"] = scores(scratch_dir, heldout)
        print("scratch", results["student_scratch"], file=sys.stderr)
    if run("speed"):
        results["rollout"] = rollout_throughput(grpo_dir)
        print("rollout", results["rollout"], file=sys.stderr)
    results["teacher_dir"], results["grpo_dir"] = teacher_dir, grpo_dir
    results["machine"] = f"{os.cpu_count()} CPU cores, jax {jax.__version__}, {jax.devices()[0].platform}"
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    try:
        figure(root, args.figure, results)
    except Exception as e:  # a stage not run yet
        print(f"figure skipped: {e}", file=sys.stderr)
    print(json.dumps({k: v for k, v in results.items() if k != "grpo_curve"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
