"""What the training loop costs beyond the bare jitted step (issue 27): ``fit`` (data, batch placement, metrics
fetched one step late, metrics.jsonl, TensorBoard, the progress bar, the checkpoint schedule) against the same
train step dispatched back to back on batches already on the device.

    python bench/step_loop.py                     # the main job (tiny-v3-arith, batch 16 x 128) and the ~88M
                                                  # V3-shaped config of bench/forward.py (batch 4 x 256)
    python bench/step_loop.py --steps 40 --only main

Per case: the loop's time per step from its own records (each step's tokens over its ``tokens_per_s``: the wall
time between two steps' metrics arriving), over steps 2..N-1 (the first compiles; the last one's time holds the
final checkpoint, which the loop writes whatever the interval); the bare step's time is N-2 steps dispatched in a
row and waited for once. Checkpoints are not written in between (``save_every`` past the run), so the overhead is
the loop's own, not Orbax's. The two are timed in alternating rounds; the overhead is the median round's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.data.packing import make_dataset  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.training.config import TrainConfig  # noqa: E402
from deepseek_jax.training.run import fit  # noqa: E402
from deepseek_jax.training.trainer import Trainer  # noqa: E402

CASES = {
    "main": (dsj.presets["tiny-v3-arith"], 16, 128),
    "88M": (BENCH_100M, 4, 256),
}


def loop_seconds_per_step(config, tc) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        records = fit(config, tc, workdir, progress=False, save_every=10**9, async_save=True)
    steps = records[1:-1]
    return float(np.mean([m["input_tokens"] / m["tokens_per_s"] for m in steps]))


def bare_seconds_per_step(config, tc, trainer=None) -> float:
    trainer = trainer or Trainer(config, tc, make_mesh(None, jax.devices()[:1]))
    data = make_dataset(None, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed)
    batches = [trainer.put_batch(next(data)) for _ in range(tc.steps)]
    state = trainer.init_state()
    state, m = trainer.run_step(state, batches[0])  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    for b in batches[1:-1]:
        state, m = trainer.run_step(state, b)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / (tc.steps - 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=sorted(CASES), default=None)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {args.steps} steps, "
          f"{args.rounds} rounds")
    for name, (config, batch, seq) in CASES.items():
        if args.only and name != args.only:
            continue
        tc = TrainConfig(steps=args.steps, batch_size=batch, seq_len=seq, learning_rate=1e-3, warmup_steps=5)
        rounds = []
        for _ in range(args.rounds):
            loop = loop_seconds_per_step(config, tc)
            bare = bare_seconds_per_step(config, tc)
            rounds.append((loop / bare - 1, loop, bare))
        over, loop, bare = sorted(rounds)[len(rounds) // 2]
        print(f"{name:>5} (batch {batch} x {seq}): loop {loop * 1e3:8.2f} ms/step, bare step {bare * 1e3:8.2f} "
              f"ms/step, overhead {over:+.1%} (median of {args.rounds} rounds; all: "
              f"{', '.join(f'{r[0]:+.1%}' for r in rounds)})")


if __name__ == "__main__":
    main()
