"""Peak host memory and throughput of ``load_pretrained`` on an HF safetensors directory, sharded over 8 simulated
CPU devices and unsharded (one device), for 2, 8 and 32 layers of a V3-shaped model of small width.

Each load runs in a fresh subprocess that reports its own peak RSS (``resource.getrusage``, ``ru_maxrss``), the
RSS right after the imports, the bytes its params hold on the devices (on CPU devices they live in host memory,
so they count in RSS: ``transient = peak - params``), and the load's wall time; GB/s is checkpoint bytes over that
time. The checkpoint was just written, so it is read from the page cache: this measures our read / reshape /
device-put path, not the disk.

    python bench/load.py                          # 2, 8, 32 layers; prints a table
    python bench/load.py --layers 2 8 --write     # also appends the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from convert_memory import write_synthetic  # noqa: E402

from deepseek_jax import ModelConfig  # noqa: E402


def load_config(layers: int) -> ModelConfig:
    """V3-shaped (MLA with q/kv LoRA, 1 dense + MoE layers with a shared expert, sigmoid routing), hidden 1024:
    about 40 MB per MoE layer in bf16."""
    return ModelConfig(
        vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        num_nextn_predict_layers=0, rope_scaling=None, max_position_embeddings=4096,
    )


_LOAD = r"""
import json, resource, sys, time
import jax
import deepseek_jax as dsj
from deepseek_jax.parallel.mesh import make_mesh
jax.devices()
after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mesh = make_mesh(sys.argv[2]) if sys.argv[2] != "none" else None
t0 = time.perf_counter()
_, params = dsj.load_pretrained(sys.argv[1], mesh=mesh)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
own = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"seconds": seconds, "peak": peak, "own": own, "imports": after_imports,
                              "devices": jax.device_count()}))
"""


def run_load(path: str, mesh: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + ("1" if mesh == "none" else "8")
    proc = subprocess.run([sys.executable, "-c", _LOAD, path, mesh], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load of {path} (mesh {mesh}) failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--mesh", default="fsdp=2,expert=4", help="the sharded case's mesh over 8 devices")
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="load-bench-", dir=args.workdir)
    rows = []
    try:
        for n in args.layers:
            src = os.path.join(work, f"hf-{n}")
            size = write_synthetic(src, load_config(n))
            for mesh in ("none", args.mesh):
                r = run_load(src, mesh)
                rows.append((n, size, mesh, r))
                print(f"layers={n} ({size / 1e9:.2f} GB) {'unsharded' if mesh == 'none' else mesh}: "
                      f"{r['seconds']:.1f} s, {size / 1e9 / r['seconds']:.2f} GB/s, peak RSS {r['peak'] / 1e9:.2f} GB "
                      f"(params {r['own'] / 1e9:.2f} GB, imports {r['imports'] / 1e9:.2f} GB, transient "
                      f"{(r['peak'] - r['own']) / 1e9:.2f} GB)", flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = ["| layers | checkpoint (GB) | devices, mesh | load (s) | GB/s | peak RSS (GB) | params on devices (GB) "
             "| peak - params (GB) | RSS after imports (GB) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, size, mesh, r in rows:
        where = "1, unsharded" if mesh == "none" else f"{r['devices']}, {mesh}"
        table.append(f"| {n} | {size / 1e9:.2f} | {where} | {r['seconds']:.1f} | {size / 1e9 / r['seconds']:.2f} | "
                     f"{r['peak'] / 1e9:.2f} | {r['own'] / 1e9:.2f} | {(r['peak'] - r['own']) / 1e9:.2f} | "
                     f"{r['imports'] / 1e9:.2f} |")
    print("\n".join(table))
    if args.write:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        header = (f"\n## load.py (`load_pretrained` of an HF directory), "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                  f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load average "
                  f"{os.getloadavg()[0]:.1f} at the end), no GPU, {mem:.0f} GiB RAM, Python "
                  f"{platform.python_version()}. Source: synthetic bf16 safetensors (`load_config`: V3-shaped, "
                  f"hidden 1024, 8+1 experts of 704, 1 GB shards), read from the page cache. Sharded: 8 simulated "
                  f"CPU devices, mesh `{args.mesh}`. Peak RSS is each loading process's own `ru_maxrss`; on CPU "
                  f"devices the params themselves live in host memory, so `peak - params` is the transient.\n\n")
        path = os.path.join(HERE, "RESULTS.md")
        with open(path, "a") as f:
            f.write(header + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
