"""Ragged (paged) decode against the padded window, one process: the serving engine's decode call
(``inference/engine.py``'s ``_decode``: 4 greedy steps over every slot in one call) on the ~88M V3-shaped config of
bench/forward.py (fp32), 8 slots of 2,176 positions, for batches of different length mixes.

    python bench/decode_paged.py                 # all cases, 5 timed calls each after a warm-up
    python bench/decode_paged.py --page 128      # another page size

"window": every row attends over the power of two (from 128) past the longest row's position, capped at the
slot (the engine's path before paged decode, and still its path on a mesh). "paged": each row reads the pages
of ``--page`` slots its own length fills (``steps.decode_pages``: the pages rounded up to 4-7 x a power of two).
The cache holds random values (timing only; tests/inference/test_paged_decode.py checks the logits). Reported:
the best call's time per decode step, and the ratio window / paged (> 1: paged is faster).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from forward import BENCH_100M  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.inference.engine import _decode  # noqa: E402
from deepseek_jax.inference.steps import decode_pages, decode_window  # noqa: E402
from deepseek_jax.layers import kv_cache  # noqa: E402

SLOTS, MAX_LEN, K = 8, 2176, 4
CASES = {
    "8 x 2,000": [2000] * 8,
    "1 x 2,000 + 7 x 100": [2000] + [100] * 7,
    "2 x 2,000 + 6 x 300": [2000] * 2 + [300] * 6,
    "8 x 100": [100] * 8,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    config = BENCH_100M
    options = dsj.ModelOptions()
    params = dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    cache = kv_cache.init_cache(config, SLOTS, MAX_LEN)
    cache = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), cache)
    tok = jnp.ones((SLOTS,), jnp.int32)
    sampling = (jnp.zeros(SLOTS), jnp.ones(SLOTS), jnp.zeros(SLOTS, jnp.uint32), jnp.zeros(SLOTS, jnp.int32))
    print(f"# {datetime.date.today()} {platform.node()} jax {jax.__version__}, {os.cpu_count()} cores; "
          f"{SLOTS} slots x {MAX_LEN}, {K} steps per call, page {args.page}")
    print("| batch (cached lengths) | window | window ms/step | paged items x page | paged ms/step | "
          "window / paged |")
    print("|---|---|---|---|---|---|")
    for name, lengths in CASES.items():
        pos = jnp.asarray(lengths, jnp.int32)
        reads = {"window": dict(window=decode_window(max(lengths) + K, MAX_LEN), paged=None),
                 "paged": dict(window=None, paged=decode_pages(lengths, args.page, K))}
        best = {}
        for way, kw in reads.items():
            nonlocal_cache = [cache]

            def call():
                c, toks, _ = _decode(params, nonlocal_cache[0], tok, pos, *sampling, config=config,
                                     options=options, k=K, **kw)
                toks.block_until_ready()
                nonlocal_cache[0] = c

            call()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            best[way] = min(times) / K * 1e3
            cache = nonlocal_cache[0]
        w = reads["window"]["window"] or MAX_LEN
        items = reads["paged"]["paged"][1]
        print(f"| {name} | {w} | {best['window']:.1f} | {items} x {args.page} | {best['paged']:.1f} | "
              f"{best['window'] / best['paged']:.2f}x |")


if __name__ == "__main__":
    main()
