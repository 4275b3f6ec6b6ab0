"""Server throughput: ``deepseek-jax serve``'s app (continuous batching) under 1, 8 and 32 concurrent clients.

    python bench/serve.py                 # the ~88M V3-shaped config, random fp32 weights, 8 slots
    python bench/serve.py --quick         # tiny-v3

The server runs in this process (uvicorn in a thread, the engine in its own), the clients are threads with the
official ``openai`` client, streaming. Each client sends one request (a 64-word prompt, 32 new tokens, greedy; EOS
off so that every request generates all 32) into cache rows of ``--max-len`` (2,048) tokens. ``--reads``: how a
decode step reads the cache: ``paged`` (the default: each row the pages of 64 slots its own length fills),
``window`` (every row the power of two from 128 past the longest running sequence), ``whole`` (the whole row).
``--long-words N``: the first request of each round has an N-word prompt (a long request beside short ones).
``--warm-pass``: every round runs once untimed first, so no step compiles on the clock (without it, a shape that
the warm-up round did not meet compiles inside a timed round, as on a server's first such batch). Reported per concurrency: wall time of the whole round, output
tokens/s, p50 / p95 time to first token, and the round's time over one request's alone (what continuous batching
saves: 8 requests one after the other would take 8x). A warm-up round compiles the steps first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from forward import BENCH_100M  # noqa: E402
from tiny_inference import word_tokenizer  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.data.tokenizer import Tokenizer  # noqa: E402
from deepseek_jax.inference.engine import Engine  # noqa: E402
from deepseek_jax.inference.server import make_app  # noqa: E402


def _serve(config, params, tokenizer, slots, max_len, reads, steps_per_call):
    import uvicorn

    engine = Engine(config, params, tokenizer=tokenizer, eos=(), slots=slots, max_len=max_len,
                    max_queue=256, window_min=None if reads == "whole" else 128,
                    page=64 if reads == "paged" else None, steps_per_call=steps_per_call).start()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, "bench", tokenizer), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return engine, server, thread, f"http://127.0.0.1:{port}/v1"


def _one(client, prompt, max_tokens):
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return first, n, time.perf_counter() - t0


def _round(client, prompts, max_tokens):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        out = list(pool.map(lambda p: _one(client, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttft = np.array([o[0] for o in out])
    return {"wall": wall, "tokens": sum(o[1] for o in out), "ttft_p50": float(np.percentile(ttft, 50)),
            "ttft_p95": float(np.percentile(ttft, 95))}


def main():
    import openai

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--warm-pass", action="store_true",
                    help="run every round once untimed first (each shape's steps compiled before the clock)")
    ap.add_argument("--long-words", type=int, default=0,
                    help="the first request of each round has a prompt of this many words (a long request beside "
                         "short ones: what ragged pages are for)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-len", type=int, default=2048, help="context per slot (the cache row)")
    ap.add_argument("--steps-per-call", type=int, default=4, help="decode steps per host round trip (engine's)")
    ap.add_argument("--reads", choices=("paged", "window", "whole"), default="paged",
                    help="what a decode step reads: each row's own pages, a window past the longest row, the "
                         "whole padded row")
    args = ap.parse_args()
    config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0) if args.quick else BENCH_100M
    params = jax.jit(lambda k: dsj.Transformer(config).init(k, jnp.zeros((1, 2), jnp.int32))["params"])(
        jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    tmp = Path(tempfile.mkdtemp())
    word_tokenizer(tmp, vocab_size=config.vocab_size)
    tokenizer = Tokenizer(str(tmp / "tokenizer.json"))
    engine, server, thread, url = _serve(config, params, tokenizer, args.slots, args.max_len, args.reads,
                                         args.steps_per_call)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    rng = np.random.default_rng(0)
    n_words = min(config.vocab_size - 8, 30000)

    def prompts(n):
        sizes = [args.long_words or args.prompt_words] + [args.prompt_words] * (n - 1)
        return [" ".join(f"w{i}" for i in rng.integers(0, n_words, k)) for k in sizes]

    try:
        clients = [int(c) for c in args.clients.split(",")]
        _round(client, prompts(args.slots), args.max_tokens)  # warm-up: compiles prefill buckets and decode
        for n in clients if args.warm_pass else ():  # every round once untimed: each shape compiled
            _round(client, prompts(n), args.max_tokens)
        single = _round(client, prompts(1), args.max_tokens)
        long = f" (the first {args.long_words})" if args.long_words else ""
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
              f"{'tiny-v3' if args.quick else 'v3-88M'} fp32, {args.slots} slots, prompt {args.prompt_words} "
              f"words{long}, {args.max_tokens} new tokens per request, greedy; cache rows of {args.max_len}, "
              f"decode reads {args.reads}, {args.steps_per_call} steps per call"
              f"{', after an untimed pass' if args.warm_pass else ''}\n")
        print("| clients | wall s | output tok/s | TTFT p50 s | TTFT p95 s | wall / one request's |")
        print("|---|---|---|---|---|---|")
        for n in clients:
            r = single if n == 1 else _round(client, prompts(n), args.max_tokens)
            print(f"| {n} | {r['wall']:.2f} | {r['tokens'] / r['wall']:.1f} | {r['ttft_p50']:.3f} | "
                  f"{r['ttft_p95']:.3f} | {r['wall'] / single['wall']:.2f}x |")
        print(f"\nengine: {engine.stats}")
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()


if __name__ == "__main__":
    main()
