"""Peak memory of ``deepseek-jax convert`` against the number of layers (the converter streams: peak should
follow the largest tensor, not the model).

For each layer count a synthetic bf16 checkpoint of a wide DeepSeek-V3-shaped config is written (streamed,
sharded at 1 GB), then converted in a fresh subprocess whose own peak RSS is read with ``os.wait4``
(``ru_maxrss``). The naive baseline reads every tensor into memory (numpy copies; what a load-everything-then-save
converter holds at least, before any dtype conversion). Disk needed: about 2x the largest checkpoint.

    python bench/convert_memory.py                      # 2, 8, 32 layers; prints a table
    python bench/convert_memory.py --layers 2 8 --write # also appends the table to bench/RESULTS.md

Each converted checkpoint is also exported back to HF safetensors (``deepseek-jax export``), whose peak RSS
is measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from deepseek_jax import ModelConfig
from deepseek_jax.checkpoint.convert.export import OutTensor, write_sharded
from deepseek_jax.checkpoint.hf_map import hf_tensor_map


def wide_config(layers: int) -> ModelConfig:
    """hidden 2048, 8 routed + 1 shared expert of 1408: ~180 MB per MoE layer in bf16."""
    return ModelConfig(
        vocab_size=16384, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        num_nextn_predict_layers=0, rope_scaling=None, max_position_embeddings=4096,
    )


def write_synthetic(path: str, config: ModelConfig) -> int:
    """A bf16 HF checkpoint with finite pseudo-random values, written one tensor at a time."""
    os.makedirs(path)
    block = (np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    tensors = []
    for tm in hf_tensor_map(config):
        dt = np.dtype(np.float32) if tm.keep_fp32 else np.dtype(ml_dtypes.bfloat16)
        n = int(np.prod(tm.hf_shape))

        def produce(n=n, shape=tm.hf_shape, dt=dt):
            return np.resize(block, n).astype(dt).reshape(shape)

        tensors += [OutTensor(key, tuple(tm.hf_shape), dt, produce) for key, _ in tm.sources]
    write_sharded(path, tensors, 1 << 30)
    d = config.to_hf_dict()
    d.pop("rope_scaling")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return sum(t.nbytes for t in tensors)


_NAIVE = """
import os, sys
import numpy as np
from deepseek_jax.checkpoint.safetensors_io import SafetensorsFile
tensors = {}
for name in sorted(os.listdir(sys.argv[1])):
    if name.endswith(".safetensors"):
        f = SafetensorsFile(os.path.join(sys.argv[1], name))
        tensors.update({k: np.array(f.get(k)) for k in f.keys()})
        f.close()
print(sum(v.nbytes for v in tensors.values()))
"""


def _popen_wait4(cmd):
    """Run ``cmd``; (its own peak RSS in GB from ``os.wait4``, wall seconds, stdout)."""
    t0 = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.execvp(cmd[0], cmd)
    os.close(w)
    chunks = []
    with os.fdopen(r) as f:
        chunks.append(f.read())
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024 / 1024, time.perf_counter() - t0, "".join(chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir)
    rows = []
    imports, _, _ = _popen_wait4([sys.executable, "-c", "import deepseek_jax.checkpoint.convert.convert, orbax.checkpoint, "
                                                         "tensorstore, jax; jax.devices()"])
    print(f"peak RSS of the imports alone (jax, orbax, tensorstore): {imports:.2f} GB", flush=True)
    try:
        for n in args.layers:
            src, dst = os.path.join(work, f"hf-{n}"), os.path.join(work, f"orbax-{n}")
            size = write_synthetic(src, wide_config(n))
            os.sync()  # the source on disk before timing, so its write-back does not compete with the conversion
            largest = max(np.prod(tm.hf_shape) * 2 for tm in hf_tensor_map(wide_config(n)))
            cmd = [sys.executable, "-m", "deepseek_jax.cli", "convert", src, dst, "--no-progress"]
            peak, wall, out = _popen_wait4(cmd)
            line = [l for l in out.splitlines() if l.startswith("converted")][0]
            seconds = float(line.split(" in ")[1].split(" s")[0])
            back = os.path.join(work, f"hf-back-{n}")
            epeak, ewall, _ = _popen_wait4([sys.executable, "-m", "deepseek_jax.cli", "export", dst, back,
                                            "--no-progress"])
            shutil.rmtree(back)
            base = None
            if not args.no_baseline:
                base, _, _ = _popen_wait4([sys.executable, "-c", _NAIVE, src])
            rows.append((n, size / 1e9, largest / 1e9, peak, size / 1e9 / seconds, wall, epeak, ewall, base))
            print(f"layers={n}: {size / 1e9:.2f} GB, peak RSS {peak:.2f} GB, {size / 1e9 / seconds:.2f} GB/s "
                  f"(conversion {seconds:.1f} s, process {wall:.1f} s); export back: peak RSS {epeak:.2f} GB, "
                  f"{ewall:.1f} s; naive load-all peak {'-' if base is None else f'{base:.2f} GB'}", flush=True)
            shutil.rmtree(src)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = ["| layers | checkpoint (GB) | largest tensor (GB) | convert peak RSS (GB) | convert GB/s "
             "| convert process (s) | export peak RSS (GB) | export process (s) | naive load-all peak RSS (GB) "
             "| naive / convert |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, size, largest, peak, gbps, wall, epeak, ewall, base in rows:
        ratio = "-" if base is None else f"{base / peak:.1f}x"
        table.append(f"| {n} | {size:.2f} | {largest:.3f} | {peak:.2f} | {gbps:.2f} | {wall:.1f} | {epeak:.2f} | "
                     f"{ewall:.1f} | {'-' if base is None else f'{base:.2f}'} | {ratio} |")
    print("\n".join(table))
    if args.write:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        load = os.getloadavg()[0]
        header = (f"\n## convert_memory.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                  f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (load average {load:.1f} at the end, "
                  f"machine shared), {mem:.0f} GiB RAM, "
                  f"{platform.system()} {platform.release()}, Python {platform.python_version()}. "
                  f"Source: synthetic bf16 safetensors (`wide_config`: hidden 2048, 8+1 experts of 1408), "
                  f"output bf16 Orbax. Peak RSS is the converting process's own `ru_maxrss` (`os.wait4`); "
                  f"the imports alone (jax, orbax, tensorstore) peak at {imports:.2f} GB.\n\n")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("# Benchmark results\n")
            f.write(header + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
