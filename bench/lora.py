"""LoRA against full fine-tuning (issue 28): the compiled memory of a train step, and a short SFT on chat data.

    python bench/lora.py                 # both
    python bench/lora.py --only memory   # the ~88M V3-shaped config of bench/forward.py, batch 4 x 256
    python bench/lora.py --only sft      # a 1-layer tiny-v3 from transformers, 40 steps on chats

1. Memory: the train step compiled for this machine's CPU (one device, bf16 compute, remat "full") by
   ``deepseek-jax plan``'s ``plan``, full fine-tuning (fp32 master weights and Adam moments for every weight)
   against LoRA rank 16 on the default targets (the base frozen in bf16, fp32 adapters and their moments only):
   argument bytes (the state plus the batch), temporary bytes, and their sum.
2. SFT: the same chat data (the answer to words w_i is the words w_{i+100}), the same steps, batch and
   learning-rate schedule from one transformers checkpoint: full fine-tuning, and LoRA (rank 8 and 32 on the
   default targets, the attention projections and the experts; rank 8 at a higher learning rate; rank 8 on every
   linear layer). Reported: the assistant-token loss of held-out chats before and after
   (our model on the exported merged weights), and the trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M  # noqa: E402

import deepseek_jax as dsj  # noqa: E402


def memory(rank: int = 16) -> list[dict]:
    from deepseek_jax.tools.plan import plan

    rows = []
    config = BENCH_100M.replace(num_nextn_predict_layers=0)
    for name, r in (("full fine-tuning", 0), (f"LoRA rank {rank}", rank)):
        p = plan(config, batch=4, seq_len=256, cpu_devices=1, precision="bf16", remat="full", steps=["train"],
                 model_name="bench-88M", train_overrides={"lora_rank": r})
        s = p.steps[0]
        rows.append({"case": name, "argument_gb": s.argument_bytes / 1e9, "state_gb": s.state_bytes / 1e9,
                     "temp_gb": s.temp_bytes / 1e9, "sum_gb": (s.argument_bytes + s.temp_bytes) / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    full, lora = rows
    print(f"LoRA / full: state {lora['state_gb'] / full['state_gb']:.3f}, argument + temp "
          f"{lora['sum_gb'] / full['sum_gb']:.3f}")
    return rows


def _assistant_loss(params, config, path, tok) -> float:
    """Mean next-token cross-entropy on the assistant tokens of every chat in ``path`` (one packed batch)."""
    from deepseek_jax.data.packing import make_dataset
    from deepseek_jax.training import losses

    b = next(make_dataset(path, seq_len=512, batch_size=2, tokenizer=tok, shuffle=False))
    logits = dsj.Transformer(config).apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
    total, n = losses.cross_entropy(logits, b["targets"], b["loss_mask"])
    return float(total / n)


def sft(steps: int = 40) -> list[dict]:
    from convert_fixtures import make_hf
    from tiny_inference import word_chats, word_tokenizer
    from tokenizers import Tokenizer

    from deepseek_jax.cli import main

    config = dsj.presets["tiny-v3"].replace(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    root = tempfile.mkdtemp(prefix="bench-lora-")
    src = os.path.join(root, "hf")
    make_hf(src, config, mtp=False)
    word_tokenizer(pathlib.Path(src))
    tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    for name, chats in (("train.jsonl", word_chats(64, 0)), ("heldout.jsonl", word_chats(24, 1))):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps({"messages": c}) + "\n" for c in chats)
    heldout = os.path.join(root, "heldout.jsonl")
    _, base = dsj.load_pretrained(src)
    before = _assistant_loss(base, config, heldout, tok)
    rows = []
    cases = (("full fine-tuning", "3e-3", []),
             ("LoRA rank 8", "1e-2", ["--lora-rank", "8"]),
             ("LoRA rank 32", "1e-2", ["--lora-rank", "32"]),
             ("LoRA rank 8, lr 5e-2", "5e-2", ["--lora-rank", "8"]),
             # every linear layer: attention, experts, shared experts and the output head (not the embedding)
             ("LoRA rank 8 on every linear, lr 5e-2", "5e-2", ["--lora-rank", "8", "--lora-targets", "*"]))
    for name, lr, extra in cases:
        work = os.path.join(root, name.replace(" ", "-").replace(",", ""))
        rc = main(["train", "--init-from", src, "--data", os.path.join(root, "train.jsonl"), "--workdir", work,
                   "--steps", str(steps), "--batch-size", "8", "--seq-len", "32", "--lr", lr, "--warmup", "4",
                   "--save-every", str(steps)] + extra)
        assert rc == 0, name
        _, params = dsj.load_pretrained(work)
        with open(os.path.join(work, "metrics.jsonl")) as f:
            train = [json.loads(line)["loss"] for line in f]
        from deepseek_jax.parallel.mesh import make_mesh
        from deepseek_jax.training.config import TrainConfig
        from deepseek_jax.training.trainer import Trainer

        rank = int(extra[1]) if extra else 0
        targets = tuple(extra[3:4])
        trainable, total = Trainer(config, TrainConfig(lora_rank=rank, lora_targets=targets),
                                   make_mesh(None)).trainable_count()
        rows.append({"case": name, "lr": float(lr), "trainable": trainable, "params": total,
                     "heldout_before": before,
                     "heldout_after": _assistant_loss(params, config, heldout, tok),
                     "train_first": train[0], "train_last5": float(np.mean(train[-5:]))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("memory", "sft"))
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if args.only in (None, "memory"):
        memory()
    if args.only in (None, "sft"):
        sft(args.steps)
