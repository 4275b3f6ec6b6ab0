"""Forward, forward + backward, train step, greedy generation and prefill: deepseek-jax vs transformers, same weights,
one process (the five CPU ratios of issue 24).

    python bench/backward.py                 # the ~88M V3-shaped config of bench/forward.py, batch 4 x 256
    python bench/backward.py --repeats 7     # more rounds (a busy machine: the ratios are per round, see below)
    python bench/backward.py --quick         # tiny-v3 (a smoke test of the script)

transformers' DeepseekV3ForCausalLM (fp32, eager attention, as tests/hf_reference.py builds it) is saved and
loaded by ``load_pretrained``, so both run the same weights (the logits are checked to agree first). Per step:

  forward + loss    ours: jit of the next-token cross-entropy; transformers: ``model(ids, labels=ids).loss``
                    under ``no_grad``
  forward + backward  ours: jit of ``jax.value_and_grad`` of that loss; transformers: ``.loss.backward()``
  train step        ours: ``Trainer.run_step`` (fp32, AdamW, router statistics, balance loss, bias update) from
                    the loaded weights; transformers: ``loss.backward(); AdamW.step(); zero_grad()``
  generate b x 32   greedy, 32 new tokens after a 16-token prompt, batch 1 and 8; ours: ``dsj.generate`` (prefill,
                    absorbed decode, a host round trip per token); transformers: ``generate(do_sample=False)``
  prefill 1 x 512   ours: ``decode.prefill`` (the full MLA path, latent cache written, logits at the last token);
                    transformers: ``model(ids, use_cache=True)`` under ``no_grad``

Each round times every case once for each framework, alternating, after a warm-up (compilation excluded); a
case's tokens/s is its best round, and its ratio (ours / transformers) the median of the per-round ratios, which
a machine shared with other jobs disturbs less than either framework's own time. Also prints each framework's
gradient cost as (forward + backward time) / (forward time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M, reference_and_ours  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.inference import steps as decode
from deepseek_jax.layers import kv_cache as kvcache  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.training.config import TrainConfig
from deepseek_jax.training.losses import cross_entropy  # noqa: E402
from deepseek_jax.training.trainer import Trainer  # noqa: E402


def _next_token_loss(model):
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        targets = jnp.roll(tokens, -1, axis=1)
        mask = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)  # the last position has no target
        s, n = cross_entropy(logits, targets, mask)
        return s / n

    return loss


GEN_PROMPT, GEN_NEW, GEN_BATCHES = 16, 32, (1, 8)


def ours_cases(cfg, params, tokens, prefill_tokens):
    model = dsj.Transformer(cfg)
    loss = _next_token_loss(model)
    fwd = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss))
    tok = jnp.asarray(tokens)

    b, t = tokens.shape
    tc = TrainConfig(steps=10 ** 6, batch_size=b, seq_len=t, precision="fp32", mtp_weight=0.0)
    trainer = Trainer(cfg, tc, make_mesh())
    # The step donates its state: the state gets its own copy of the weights.
    holder = {"state": trainer.state_from_params(jax.tree.map(jnp.copy, params))}
    batch = trainer.put_batch({"inputs": tokens.astype(np.int32), "targets": np.roll(tokens, -1, 1).astype(np.int32),
                               "loss_mask": np.ones(tokens.shape, np.float32),
                               "positions": np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy(),
                               "segment_ids": np.ones(tokens.shape, np.int32)})

    def train():
        holder["state"], m = trainer.run_step(holder["state"], batch)
        jax.block_until_ready(m)

    pb, pt = prefill_tokens.shape
    ptok = jnp.asarray(prefill_tokens)
    lengths = jnp.full((pb,), pt, jnp.int32)
    slots = decode.cache_length(pt, 64)

    def prefill():  # the prefill writes (and donates) the cache it is given: a new one per call (~3 MB of zeros)
        c = jax.block_until_ready(kvcache.init_cache(cfg, pb, slots))
        _, logits, _ = decode.prefill(params, c, ptok, lengths, config=cfg, options=dsj.ModelOptions())
        logits.block_until_ready()

    def generate(b):
        prompts = [list(map(int, row)) for row in np.asarray(tokens[:1, :GEN_PROMPT]).repeat(b, 0)]
        return lambda: dsj.generate(cfg, params, prompts, max_new_tokens=GEN_NEW, eos_token_id=None)

    return {
        "forward + loss": lambda: fwd(params, tok).block_until_ready(),
        "forward + backward": lambda: jax.block_until_ready(grad(params, tok)),
        "train step (AdamW)": train,
        **{f"generate {b} x {GEN_NEW}": generate(b) for b in GEN_BATCHES},
        "prefill": prefill,
    }


def hf_cases(ref, tokens, prefill_tokens):
    ids = torch.as_tensor(tokens, dtype=torch.long)
    pids = torch.as_tensor(prefill_tokens, dtype=torch.long)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)

    def fwd():
        with torch.no_grad():
            ref(ids, labels=ids).loss.item()

    def fwd_bwd():
        ref(ids, labels=ids).loss.backward()
        ref.zero_grad(set_to_none=True)

    def train():
        ref(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def prefill():
        with torch.no_grad():
            ref(pids, use_cache=True)

    def generate(b):
        prompt = ids[:1, :GEN_PROMPT].repeat(b, 1)

        @torch.no_grad()
        def run():
            ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_NEW,
                         min_new_tokens=GEN_NEW, do_sample=False, use_cache=True, pad_token_id=0)

        return run

    return {"forward + loss": fwd, "forward + backward": fwd_bwd, "train step (AdamW)": train,
            **{f"generate {b} x {GEN_NEW}": generate(b) for b in GEN_BATCHES}, "prefill": prefill}


def run(name, config, batch, length, prefill_len, repeats):
    ref, cfg, params = reference_and_ours(config)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, config.vocab_size, (batch, length))
    prefill_tokens = rng.randint(0, config.vocab_size, (1, prefill_len))
    model = dsj.Transformer(cfg)
    with torch.no_grad():
        expected = ref(torch.as_tensor(tokens)).logits.numpy()
    diff = np.abs(np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)) - expected).max()
    ours, theirs = ours_cases(cfg, params, tokens, prefill_tokens), hf_cases(ref, tokens, prefill_tokens)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name}: {n_params / 1e6:.1f}M params, max|dlogits| = {diff:.1e}; batch {batch} x {length}, prefill 1 x "
          f"{prefill_len}; {repeats} rounds", flush=True)
    for case in ours:  # warm-up: compile, first touches
        ours[case](), theirs[case]()
        ours[case](), theirs[case]()
    times = {case: ([], []) for case in ours}
    for _ in range(repeats):
        for case in ours:
            for i, fn in enumerate((ours[case], theirs[case])):
                t = time.perf_counter()
                fn()
                times[case][i].append(time.perf_counter() - t)
    print(f"| {'step':20s} | {'ours tok/s':>10s} | {'transformers tok/s':>18s} | {'ratio':>6s} |")
    print(f"|{'-' * 22}|{'-' * 12}:|{'-' * 20}:|{'-' * 7}:|")
    for case, (o, h) in times.items():
        n = prefill_len if case == "prefill" else batch * length
        if case.startswith("generate"):
            n = int(case.split()[1]) * GEN_NEW
        label = f"prefill 1 x {prefill_len}" if case == "prefill" else case
        ratio = float(np.median(np.asarray(h) / np.asarray(o)))
        print(f"| {label:20s} | {n / min(o):10.0f} | {n / min(h):18.0f} | {ratio:5.2f}x |")
    for i, who in enumerate(("ours", "transformers")):
        f, g = np.asarray(times["forward + loss"][i]), np.asarray(times["forward + backward"][i])
        print(f"{who}: (forward + backward) / forward = {min(g) / min(f):.2f} (best rounds), "
              f"{float(np.median(g / f)):.2f} (median per round)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.quick:
        run("tiny-v3", dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0), 4, 128, 256, args.repeats)
    else:
        run("v3-88M", BENCH_100M, 4, 256, 512, args.repeats)


if __name__ == "__main__":
    main()
