"""The Grain pipeline on a large text corpus (issue 27): how soon training starts, how much host memory it holds,
and how fast the loader alone reads, against the in-memory loader.

    python bench/stream_data.py                       # a 400 MB .jsonl made here, the real DeepSeek tokenizer
    python bench/stream_data.py --mb 40 --memory      # also the in-memory loader, on a corpus it can hold

Parts:
- **Start.** ``deepseek-jax train --preset tiny-v3 --data corpus.jsonl --pipeline grain --steps 2`` (batch 8 x 256)
  as a subprocess: seconds from launch until step 1's metrics are written, and the peak RSS of the process and
  its children (``os.wait4``). ``--memory`` runs the same with ``--pipeline memory``.
- **Loader alone.** ``make_dataset(pipeline="grain", workers=W)`` in a fresh process, W in ``--workers``
  (``--memory``: the in-memory loader too): seconds to the first batch, its peak RSS (the process or its largest
  worker), then tokens/s over ``--batches`` batches (8 x 256 each), beside the tokens/s of the train step on
  ``--preset`` (the step's own ``tokens_per_s`` from the run above).

The corpus: documents of 50-2,000 words drawn from a fixed list of English words (seeded), one ``{"text": ...}``
per line, written once per size into the temp dir and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all would their we him when who more will no if out so said what up "
         "its about than into them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three").split()


def make_corpus(path: str, mb: int, seed: int = 0) -> str:
    if os.path.exists(path) and os.path.getsize(path) >= mb * 1e6:
        return path
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        written = 0
        while written < mb * 1e6:
            n = int(rng.integers(50, 2000))
            line = json.dumps({"text": " ".join(words[rng.integers(0, len(words), n)])}) + "\n"
            f.write(line)
            written += len(line)
    os.replace(tmp, path)
    return path


def start(corpus: str, workdir: str, pipeline: str, preset: str) -> dict:
    """Seconds to step 1's metrics, the whole run's seconds, peak RSS (GB) of the run's processes."""
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "--preset", preset, "--data", corpus,
           "--pipeline", pipeline, "--steps", "3", "--batch-size", "8", "--seq-len", "256", "--workdir", workdir,
           "--save-every", "1000", "--no-resume"]
    shutil.rmtree(workdir, ignore_errors=True)  # an earlier run's metrics.jsonl would read as this one's first step
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        first, done = None, 0
        while not done:  # wait4: this child's own peak RSS (RUSAGE_CHILDREN would be the largest of all so far)
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if first is None and os.path.exists(metrics) and os.path.getsize(metrics):
                first = time.perf_counter() - t0
            time.sleep(0.05)
        total = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    step_tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    rss = usage.ru_maxrss / 1e6  # kB -> GB
    return {"first_step_s": first if first is not None else total, "total_s": total, "peak_rss_gb": rss,
            "step_tokens_per_s": float(np.median(step_tps)) if step_tps else None}


LOADER = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
from deepseek_jax.data.packing import make_dataset
from deepseek_jax.data.tokenizer import default_tokenizer_path
corpus, pipeline, workers, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = Tokenizer.from_file(str(default_tokenizer_path()))
t0 = time.perf_counter()
ds = make_dataset(corpus, seq_len=256, batch_size=8, tokenizer=tokenizer, pipeline=pipeline,
                  **({"workers": workers} if pipeline == "grain" else {}))
next(ds)
first = time.perf_counter() - t0
t1 = time.perf_counter()
tokens = sum(int(next(ds)["segment_ids"].astype(bool).sum()) for _ in range(batches))
rate = tokens / (time.perf_counter() - t1)
getattr(ds, "close", lambda: None)()
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT " + json.dumps({"first_batch_s": first, "tokens_per_s": rate, "peak_rss_gb": rss / 1e6}))
"""


def loader(corpus: str, pipeline: str, workers: int, batches: int) -> dict:
    """The loader alone, in a fresh process (its own peak RSS, the largest of it and its Grain workers)."""
    out = subprocess.run([sys.executable, "-c", LOADER, corpus, pipeline, str(workers), str(batches)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the loader failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=400)
    p.add_argument("--preset", default="tiny-v3")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--memory", action="store_true", help="also start with --pipeline memory")
    p.add_argument("--no-train", action="store_true", help="the loader alone (no train run, no step tokens/s)")
    p.add_argument("--baseline-mb", type=int, default=1,
                   help="also start the same run on a corpus of this many MB (0: not), for the memory the run "
                        "holds whatever the data")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "deepseek-jax-bench-stream"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    t = time.perf_counter()
    corpus = make_corpus(os.path.join(args.dir, f"corpus-{args.mb}mb.jsonl"), args.mb)
    print(f"corpus: {corpus}, {os.path.getsize(corpus) / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s to make "
          f"or find)", flush=True)
    pipelines = ("grain", "memory") if args.memory else ("grain",)
    runs = {}
    for pipeline in pipelines if not args.no_train else ():
        runs[pipeline] = start(corpus, os.path.join(args.dir, f"run-{pipeline}"), pipeline, args.preset)
        print(f"train start, {pipeline}: {json.dumps(runs[pipeline])}", flush=True)
    if not args.no_train and args.baseline_mb:  # what the same run holds on a corpus too small to matter
        small = make_corpus(os.path.join(args.dir, f"corpus-{args.baseline_mb}mb.jsonl"), args.baseline_mb)
        base = start(small, os.path.join(args.dir, "run-baseline"), "grain", args.preset)
        print(f"train start, grain, {args.baseline_mb} MB corpus (baseline): {json.dumps(base)}", flush=True)
    step_rate = runs["grain"]["step_tokens_per_s"] if runs else None
    cases = [("grain", int(w)) for w in args.workers.split(",")] + ([("memory", 0)] if args.memory else [])
    for pipeline, w in cases:
        r = loader(corpus, pipeline, w, args.batches)
        than = f" ({r['tokens_per_s'] / step_rate:.1f}x the {args.preset} step's {step_rate:,.0f})" if step_rate else ""
        print(f"loader alone, {pipeline}, {w} workers: first batch {r['first_batch_s']:.2f} s, peak RSS "
              f"{r['peak_rss_gb']:.2f} GB, {r['tokens_per_s']:,.0f} tokens/s{than}", flush=True)


if __name__ == "__main__":
    main()
