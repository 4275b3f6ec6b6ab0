"""Training-step throughput and the fp8 loss gap.

    python bench/train_step.py               # tiny-v3 and a ~88M V3-shaped config, then the fp8 gap
    python bench/train_step.py --quick       # tiny-v3 only, short gap run

1. Train-step tokens/s (forward + backward + AdamW) for our fp32 / bf16 / fp8-emulated recipes, side by side
   with transformers' DeepseekV3ForCausalLM training step (fp32, and bf16 autocast) on the same config, batch
   and CPU; the ratio is ours / transformers at the same precision (fp8 against transformers bf16).
2. The fp8 vs bf16 relative loss gap after the same number of steps on the built-in arithmetic data
   (DeepSeek-V3 reports < 0.25% at scale).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M  # noqa: E402
from hf_reference import hf_model  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.data.packing import make_dataset  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.trainer import Trainer  # noqa: E402


def ours_tokens_per_s(config, precision, batch, seq, steps):
    tc = TrainConfig(steps=steps + 2, batch_size=batch, seq_len=seq, precision=precision, mtp_weight=0.0)
    trainer = Trainer(config, tc, make_mesh())
    state = trainer.init_state()
    data = make_dataset(None, seq_len=seq, batch_size=batch, seed=0)
    batches = [trainer.put_batch(next(data)) for _ in range(steps + 1)]
    state, m = trainer.run_step(state, batches[0])  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    for b in batches[1:]:
        state, m = trainer.run_step(state, b)
    jax.block_until_ready(m)
    return batch * seq * steps / (time.perf_counter() - t)


def hf_tokens_per_s(config, bf16, batch, seq, steps):
    model = hf_model(config, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.as_tensor(np.random.RandomState(0).randint(3, 18, (batch, seq)))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq * steps / (time.perf_counter() - t)


def throughput(name, config, batch, seq, steps):
    config = config.replace(num_nextn_predict_layers=0)  # transformers trains no MTP module
    hf32 = hf_tokens_per_s(config, False, batch, seq, steps)
    hf16 = hf_tokens_per_s(config, True, batch, seq, steps)
    for precision, ref, ref_name in (("fp32", hf32, "fp32"), ("bf16", hf16, "bf16"), ("fp8", hf16, "bf16")):
        ours = ours_tokens_per_s(config, precision, batch, seq, steps)
        print(f"{name:8s} batch={batch} seq={seq} {precision}: ours {ours:8.0f} tok/s   transformers({ref_name}) "
              f"{ref:8.0f} tok/s   ratio {ours / ref:5.2f}x", flush=True)


def loss_gap(steps, batch, seq):
    final = {}
    for precision in ("bf16", "fp8"):
        tc = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, precision=precision)
        trainer = Trainer(dsj.presets["tiny-v3"], tc, make_mesh())
        state = trainer.init_state()
        data = make_dataset(None, seq_len=seq, batch_size=batch, seed=0)
        losses = []
        for _ in range(steps):
            state, m = trainer.run_step(state, trainer.put_batch(next(data)))
            losses.append(float(m["loss"]))
        final[precision] = float(np.mean(losses[-10:]))  # mean of the last 10 steps, less noisy
    gap = (final["fp8"] - final["bf16"]) / final["bf16"]
    print(f"tiny-v3 after {steps} steps (batch {batch} x {seq}): bf16 loss {final['bf16']:.4f}, fp8 loss "
          f"{final['fp8']:.4f}, relative gap {100 * gap:+.2f}%", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    throughput("tiny-v3", dsj.presets["tiny-v3"], 8, 128, 5)
    if not args.quick:
        throughput("v3-88M", BENCH_100M, 4, 256, 3)
    loss_gap(60 if args.quick else 200, 16, 128)


if __name__ == "__main__":
    main()
