"""MTP speculative decoding on a model trained with `deepseek-jax train`: acceptance rate and speed-up.

    python bench/speculative.py [--workdir runs/bench-spec]

Trains tiny-v3 on the built-in arithmetic data first if the work directory has no checkpoint (about 3 minutes
on a CPU), then generates greedily from held-out arithmetic prompts with and without MTP drafting, checks the
outputs are identical, and prints the draft acceptance rate and decode tokens/s of both.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import deepseek_jax as dsj
from deepseek_jax.checkpoint.train_dir import is_train_workdir
from deepseek_jax.data.tasks.arithmetic import EOS_ID, arithmetic_text, encode
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.run import fit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench-spec")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not is_train_workdir(args.workdir):
        import json
        config = dsj.presets["tiny-v3"].replace(bos_token_id=1, eos_token_id=EOS_ID)
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, "config.json"), "w") as f:
            json.dump(config.to_hf_dict(), f)
        tc = TrainConfig(steps=args.steps, batch_size=16, seq_len=128)
        with open(os.path.join(args.workdir, "train_config.json"), "w") as f:
            json.dump(tc.__dict__, f)
        fit(config, tc, args.workdir, save_every=args.steps)
    config, params = dsj.load_pretrained(args.workdir)
    docs = arithmetic_text(seed=999, num_documents=args.batch)
    prompts = [encode(d)[:-1][: 2 + d.index("=") + 1] for d in docs]  # BOS, the first sum up to its "="
    runs = {}
    for spec in (False, True):
        dsj.generate(config, params, prompts, max_new_tokens=8, eos_token_id=None, speculative=spec)  # compile
        runs[spec] = dsj.generate(config, params, prompts, max_new_tokens=args.new_tokens, eos_token_id=None,
                                  speculative=spec)
    same = all(np.array_equal(a, b) for a, b in zip(runs[False].tokens, runs[True].tokens))
    plain, spec = runs[False].stats, runs[True].stats
    print(f"tiny-v3 trained {args.steps} steps on arithmetic; batch {args.batch}, {args.new_tokens} new tokens, greedy")
    print(f"  plain decode       {plain['decode_tokens_per_s']:8.1f} tok/s")
    print(f"  MTP speculative    {spec['decode_tokens_per_s']:8.1f} tok/s   acceptance {spec['acceptance_rate']:.2f}   "
          f"speed-up {spec['decode_tokens_per_s'] / plain['decode_tokens_per_s']:.2f}x   identical output: {same}")


if __name__ == "__main__":
    main()
