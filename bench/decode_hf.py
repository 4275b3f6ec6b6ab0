"""Prefill and greedy generation: deepseek-jax (``generate`` and the serving ``Engine``) vs transformers, same
weights (fp32), one process (the CPU cases of issue 29).

    python bench/decode_hf.py                      # the ~88M V3-shaped config of bench/forward.py, 3 rounds
    python bench/decode_hf.py --repeats 5          # more rounds (a busy machine: the ratios are per round)
    python bench/decode_hf.py --cases b1,b8        # some cases only: prefill, b1, b8, b8-long
    python bench/decode_hf.py --quick              # tiny-v3 and shorter prompts (a smoke test of the script)

transformers' DeepseekV3ForCausalLM (fp32, eager attention, as tests/hf_reference.py builds it) is saved and
loaded by ``load_pretrained`` (``bench/forward.py``'s ``reference_and_ours``), so both run the same weights (the
logits are checked to agree first). The cases:

  prefill 1 x 512      ours: ``steps.prefill`` (jitted; the full MLA path, latent cache written, logits at the last
                       token), as bench/backward.py; transformers: ``model(ids, use_cache=True)`` under ``no_grad``
                       (logits at every position), and again with ``logits_to_keep=1`` (what its ``generate``'s
                       prefill runs)
  b1 / b8              greedy, a 64-token prompt per row (different rows) + 32 new tokens, batch 1 / 8
  b8-long              batch 8, row i's prompt 2,048 - 16 i tokens (ragged: the padded cache's worst case) + 32 new

For each generation case ours runs two ways: ``dsj.generate`` (one batched prefill, then one host round trip per
token), and the serving ``Engine`` (``inference/engine.py``: ``slots`` = batch, ``max_len`` the next multiple of 128
past prompt + 32, ``eos=()``, the default 4 decode steps per call; the batch's requests are all submitted before
its loop starts, each prefilled alone into its slot, and the time runs from the first submit to the last request's
finish; the Engine is built, and its cache pool allocated, before the clock starts). transformers runs
``generate(do_sample=False, eos_token_id=None)`` with left padding and its ``attention_mask`` (every row its own
length, as transformers requires for batched generation). EOS is off everywhere: every row generates all 32 tokens.

Tokens/s are generated tokens (batch x 32) over the wall time of the whole call, prefill included (prefill: prompt
tokens over its time). Decode-only tokens/s are batch x 31 over the time from the last row's first token (the one
the prefill samples) to the last token, for all three alike (ours: ``generate``'s ``on_token`` events and the
Engine's request callbacks; transformers: a streamer's ``put`` times). Each round runs every case once for each
implementation, after two warm-up rounds (compilation excluded); a tokens/s figure is its best round, a ratio (ours /
transformers) the median of the per-round ratios, which a machine shared with other jobs disturbs less than either
side's own time. The greedy tokens of each ours-way are compared with transformers' (random weights can give
near-ties, so mismatches are reported, not asserted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M, reference_and_ours  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.inference import steps as decode  # noqa: E402
from deepseek_jax.inference.engine import Engine, Request  # noqa: E402
from deepseek_jax.inference.generation import default_options  # noqa: E402
from deepseek_jax.layers import kv_cache as kvcache  # noqa: E402

NEW = 32  # new tokens per row
CASES = ("prefill", "b1", "b8", "b8-long")
# (prefill length, short prompt, long prompt, the long prompts' step between rows)
FULL_SIZES = (512, 64, 2048, 16)
QUICK_SIZES = (128, 16, 256, 16)


@dataclasses.dataclass
class Run:
    """One timed call: its wall time, the decode-only part (or None) and the generated tokens per row (or None)."""

    wall_s: float
    decode_s: Optional[float] = None
    tokens: Optional[list] = None


class _TokenClock:
    """The times at which each row got its first and its last token (callbacks from one thread)."""

    def __init__(self, batch: int):
        self.first: list[Optional[float]] = [None] * batch
        self.last = 0.0
        self.tokens: list[list[int]] = [[] for _ in range(batch)]

    def add(self, row: int, token: int) -> None:
        now = time.perf_counter()
        self.tokens[row].append(int(token))
        if self.first[row] is None:
            self.first[row] = now
        self.last = now

    def decode_s(self) -> float:
        return self.last - max(self.first)


# ----- ours ---------------------------------------------------------------------------------------
def ours_prefill(cfg, params, length: int) -> Callable[[], Run]:
    ptok = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (1, length)), jnp.int32)
    lengths = jnp.full((1,), length, jnp.int32)
    slots = decode.cache_length(length, 64)
    options = default_options()

    def run():  # the prefill donates the cache it writes: a new one per call (allocated outside the clock)
        cache = jax.block_until_ready(kvcache.init_cache(cfg, 1, slots))
        t = time.perf_counter()
        _, logits, _ = decode.prefill(params, cache, ptok, lengths, config=cfg, options=options)
        logits.block_until_ready()
        return Run(time.perf_counter() - t)

    return run


def ours_generate(cfg, params, prompts) -> Callable[[], Run]:
    def run():
        clock = _TokenClock(len(prompts))
        t = time.perf_counter()
        dsj.generate(cfg, params, prompts, max_new_tokens=NEW, eos_token_id=None,
                     on_token=lambda e: clock.add(e.index, e.token))
        return Run(time.perf_counter() - t, clock.decode_s(), clock.tokens)

    return run


def ours_engine(cfg, params, prompts) -> Callable[[], Run]:
    b = len(prompts)
    max_len = -(-(max(map(len, prompts)) + NEW) // 128) * 128

    def run():
        engine = Engine(cfg, params, eos=(), slots=b, max_len=max_len)  # default steps_per_call (4)
        jax.block_until_ready(engine.cache)
        clock, done, finished = _TokenClock(b), threading.Event(), []

        def listener(row):
            def on_event(text, token, logprob, finish):
                if token is not None:
                    clock.add(row, token)
                if finish is not None:
                    finished.append((row, finish))
                    if len(finished) == b:
                        done.set()
            return on_event

        t = time.perf_counter()
        requests = [engine.submit(Request(prompt=p, max_tokens=NEW, on_event=listener(i)))
                    for i, p in enumerate(prompts)]
        engine.start()
        done.wait()
        wall = time.perf_counter() - t
        engine.stop()
        bad = [(row, why, requests[row].error) for row, why in finished if why != "length"]
        if bad:
            raise RuntimeError(f"Engine requests did not finish by length: {bad}")
        return Run(wall, clock.decode_s(), clock.tokens)

    return run


# ----- transformers -------------------------------------------------------------------------------
def hf_prefill(ref, vocab_size: int, length: int, last_only: bool) -> Callable[[], Run]:
    ids = torch.as_tensor(np.random.RandomState(1).randint(0, vocab_size, (1, length)), dtype=torch.long)
    extra = {"logits_to_keep": 1} if last_only else {}

    @torch.no_grad()
    def run():
        t = time.perf_counter()
        ref(ids, use_cache=True, **extra)
        return Run(time.perf_counter() - t)

    return run


def hf_generate(ref, prompts) -> Callable[[], Run]:
    from transformers.generation.streamers import BaseStreamer

    b, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1

    class Clock(BaseStreamer):  # put(): first the prompt, then each step's new tokens [B]
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.no_grad()
    def run():
        clock = Clock()
        t = time.perf_counter()
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0, use_cache=True, streamer=clock)
        wall = time.perf_counter() - t
        return Run(wall, clock.times[-1] - clock.times[1], out[:, width:].tolist())

    return run


# ----- the bench ----------------------------------------------------------------------------------
def _prompts(rng, vocab: int, batch: int, length: int, step: int = 0) -> list[list[int]]:
    return [rng.randint(0, vocab, length - step * i).tolist() for i in range(batch)]


def _agreement(a: list, b: list) -> str:
    equal = sum(int(x == y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(len(r) for r in b)
    rows = sum(ra == rb for ra, rb in zip(a, b))
    first = [next((j for j, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    diverge = [f for f in first if f is not None]
    where = f", first divergence at token {min(diverge)}" if diverge else ""
    return f"{equal}/{total} tokens equal, {rows}/{len(b)} rows identical{where}"


def _machine() -> str:
    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; python "
            f"{platform.python_version()}, jax {jax.__version__} on {jax.devices()[0].platform}, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
            f"git {commit}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-v3 and short prompts (a smoke test)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after two warm-up rounds)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; expected some of {', '.join(CASES)}")

    torch.set_num_threads(os.cpu_count() or 1)  # as bench/backward.py
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    print(_machine(), flush=True)

    name, config = ("tiny-v3", dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)) if args.quick \
        else ("v3-88M", BENCH_100M)
    prefill_len, short, long, step = QUICK_SIZES if args.quick else FULL_SIZES
    ref, cfg, params = reference_and_ours(config)
    rng = np.random.RandomState(0)
    check = rng.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        expected = ref(torch.as_tensor(check)).logits.numpy()
    got = jax.jit(lambda p, t: dsj.Transformer(cfg).apply({"params": p}, t))(params, jnp.asarray(check))
    diff = float(np.abs(np.asarray(got) - expected).max())
    n_params = sum(x.size for x in jax.tree.leaves(params))

    # case -> (label, batch, {(ours way, transformers way): (ours runner, transformers runner)}, tokens per call)
    table = {}
    if "prefill" in cases:
        ours = ours_prefill(cfg, params, prefill_len)
        table["prefill"] = (f"prefill 1 x {prefill_len}", 1, {
            ("jit prefill", "forward"): (ours, hf_prefill(ref, config.vocab_size, prefill_len, False)),
            ("jit prefill", "forward, last logits"): (ours, hf_prefill(ref, config.vocab_size, prefill_len, True)),
        }, prefill_len)
    for case, batch, length, stp in (("b1", 1, short, 0), ("b8", 8, short, 0), ("b8-long", 8, long, step)):
        if case not in cases:
            continue
        prompts = _prompts(rng, config.vocab_size, batch, length, stp)
        size = f"{length}" if not stp else f"{length - stp * (batch - 1)}..{length}"
        theirs = hf_generate(ref, prompts)
        table[case] = (f"{batch} x ({size} + {NEW})", batch, {
            ("generate", "generate"): (ours_generate(cfg, params, prompts), theirs),
            ("Engine", "generate"): (ours_engine(cfg, params, prompts), theirs),
        }, batch * NEW)

    print(f"{name}: {n_params / 1e6:.1f}M params, fp32, max|dlogits| = {diff:.1e}; {NEW} new tokens, greedy, EOS "
          f"off; {args.repeats} rounds after 2 warm-up rounds", flush=True)

    # Each distinct runner once per round; a transformers runner shared by two rows runs once.
    runners: dict[str, dict[int, Callable[[], Run]]] = {}
    for case, (_, _, pairs, _) in table.items():
        seen = runners.setdefault(case, {})
        for o, h in pairs.values():
            seen.setdefault(id(o), o)
            seen.setdefault(id(h), h)
    results: dict[str, dict[int, list[Run]]] = {c: {k: [] for k in r} for c, r in runners.items()}
    t_start = time.perf_counter()
    for round_ in range(2 + args.repeats):
        t_round = time.perf_counter()
        for case, fns in runners.items():
            for key, fn in fns.items():
                out = fn()
                if round_ >= 2:
                    results[case][key].append(out)
        print(f"round {round_ + 1}/{2 + args.repeats} ({'warm-up' if round_ < 2 else 'timed'}): "
              f"{time.perf_counter() - t_round:.1f} s", flush=True)

    print("\n| case | ours | transformers | ours tok/s | transformers tok/s | ratio | decode-only ours tok/s | "
          "decode-only transformers tok/s | decode ratio |")
    print("|---|---|---|--:|--:|--:|--:|--:|--:|")
    spread = []  # each row's per-round ratios: how much the machine disturbed the rounds
    for case, (label, batch, pairs, n) in table.items():
        for (o_name, h_name), (o, h) in pairs.items():
            ro, rh = results[case][id(o)], results[case][id(h)]
            wo, wh = np.array([r.wall_s for r in ro]), np.array([r.wall_s for r in rh])
            spread.append(f"  {label}, {o_name} / {h_name}: " + ", ".join(f"{x:.2f}" for x in wh / wo))
            row = (f"| {label} | {o_name} | {h_name} | {n / wo.min():.0f} | {n / wh.min():.0f} | "
                   f"{float(np.median(wh / wo)):.2f}x |")
            if ro[0].decode_s is not None:
                d = batch * (NEW - 1)
                do, dh = np.array([r.decode_s for r in ro]), np.array([r.decode_s for r in rh])
                row += f" {d / do.min():.0f} | {d / dh.min():.0f} | {float(np.median(dh / do)):.2f}x |"
            else:
                row += " | | |"
            print(row)

    print("\nPer-round ratios (ours / transformers, whole calls):")
    print("\n".join(spread))
    print("\nGreedy tokens (last round):")
    for case, (label, batch, pairs, _) in table.items():
        if case == "prefill":
            continue
        (g, h), (e, _) = pairs[("generate", "generate")], pairs[("Engine", "generate")]
        tg, te, th = (results[case][id(x)][-1].tokens for x in (g, e, h))
        for rows in (tg, te, th):
            assert all(len(r) == NEW for r in rows), f"{case}: a row did not generate {NEW} tokens"
        print(f"  {label}: generate vs transformers {_agreement(tg, th)}; Engine vs transformers "
              f"{_agreement(te, th)}; generate vs Engine {_agreement(tg, te)}")
    print(f"\nwhole bench: {time.perf_counter() - t_start:.0f} s (rounds, warm-up and compilation included)")


if __name__ == "__main__":
    main()
