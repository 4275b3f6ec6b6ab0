"""DeepSeek-V4-Flash's cache against V3.2's and V3's: bytes per token held, and bytes a decode step reads.

    python bench/v4_cache.py                                   # by hand, and one layer of each kind by XLA:CPU
    JAX_PLATFORMS=cpu python bench/v4_cache.py --topology v5p:2x2x1   # the compiler's count for one TPU chip

By hand, per sequence, bf16 cached vectors (the compressors' state is fp32), the whole model:
- V3: 576 latent values per token and layer (61 layers), all read every step;
- V3.2: 576 + 128 (the indexer key) per token and layer; a step reads every indexer key and the 2,048 picked
  latent rows;
- V4-Flash (``kv_cache.v4_cache_bytes``): per layer a ring of 128 window entries of 512; 20 CSA layers hold one
  pooled entry of 512 and one indexer key of 128 per 4 tokens, 23 HCA layers one entry of 512 per 128 tokens; a
  step reads the ring, every indexer key and the 512 picked entries (CSA), every entry (HCA), and the state.

By the compiler: one decode step (batch ``--batch``) of a one-layer V4 model of Flash's attention width (hidden
4096, 64 heads on one K=V head of 512, indexer 64 x 128 picking 512; 8 experts and a 1,024-token vocabulary so
that neither dominates), one CSA and one HCA model, at each cache length: ``bytes accessed`` from
``cost_analysis()`` less the same at a 2,048-token cache (what the longer cache adds), beside the same difference
by hand. The attention block is the cache length, so no loop hides trips from the count.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from decode_bytes import decode_step_bytes  # noqa: E402  (bench/ is the script's directory)

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.config.model import CSA, HCA  # noqa: E402
from deepseek_jax.layers import kv_cache  # noqa: E402
from deepseek_jax.tools.plan import target_devices  # noqa: E402

BASE = 2048
LENGTHS = (8192, 131072, 1048576)


def v4_layer_read(config, kind: str, length: int) -> int:
    """Cache bytes one decode step of one V4 layer reads for one sequence (bf16 vectors, fp32 state)."""
    c = config
    shapes = kv_cache.v4_entry_shapes(c, kind, length)
    state = sum(s[0] * s[1] * 4 for name, s in shapes.items() if name.endswith("_state"))
    read = c.sliding_window * c.head_dim * 2 + state
    if kind == HCA:
        read += shapes["pool"][0] * c.head_dim * 2
    elif kind == CSA:
        n = shapes["pool"][0]
        read += n * c.index_head_dim * 2 + min(c.index_topk, n) * c.head_dim * 2
    return read


def whole_models(length: int) -> dict:
    """Per sequence: cache bytes held per token and cache bytes a decode step reads, for V3, V3.2, V4-Flash."""
    v3, v32, flash = (dsj.presets[n] for n in ("deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash"))
    latent = v3.kv_lora_rank + v3.qk_rope_head_dim
    out = {
        "v3": (kv_cache.cache_bytes_per_token(v3, "bfloat16"), 2 * length * latent * v3.num_hidden_layers),
        "v3.2": (kv_cache.cache_bytes_per_token(v32, "bfloat16"),
                 2 * (length * v32.index_head_dim + min(v32.index_topk, length) * latent) * v32.num_hidden_layers),
        "v4-flash": (sum(kv_cache.v4_cache_bytes(flash, length, "bfloat16").values()) / length,
                     sum(v4_layer_read(flash, kind, length) for kind in flash.layer_types)),
    }
    return {k: {"bytes_per_token": float(a), "decode_read": float(b)} for k, (a, b) in out.items()}


def one_layer(kind: str):
    flash = dsj.presets["deepseek-v4-flash"]
    return flash.replace(num_hidden_layers=1, layer_types=(kind,), mlp_layer_types=("moe",), vocab_size=1024,
                         n_routed_experts=8)


def step_bytes(kind: str, cache_len: int, batch: int, devices) -> float:
    return decode_step_bytes(one_layer(kind), cache_len, batch, devices)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--topology", default=None, help="a TPU topology (the tpu extra); default: this CPU")
    ap.add_argument("--no-compile", action="store_true", help="the by-hand tables only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    print("whole models, per sequence, bf16 cache: bytes held per token / cache bytes read per decode step")
    print(f"{'cache':>8} {'V3':>22} {'V3.2':>22} {'V4-Flash':>22} {'Flash/V3.2 held':>16} {'read':>7} "
          f"{'Flash/V3 held':>14} {'read':>7}")
    rows = {}
    for n in args.lengths:
        m = rows[n] = whole_models(n)
        cell = {k: f"{v['bytes_per_token']:>8,.0f} / {v['decode_read'] / 2**20:>8,.1f} MiB" for k, v in m.items()}
        print(f"{n:>8} {cell['v3']:>22} {cell['v3.2']:>22} {cell['v4-flash']:>22} "
              f"{m['v4-flash']['bytes_per_token'] / m['v3.2']['bytes_per_token']:>16.3f} "
              f"{m['v4-flash']['decode_read'] / m['v3.2']['decode_read']:>7.3f} "
              f"{m['v4-flash']['bytes_per_token'] / m['v3']['bytes_per_token']:>14.3f} "
              f"{m['v4-flash']['decode_read'] / m['v3']['decode_read']:>7.3f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"by_hand": rows}) + "\n")
    if args.no_compile:
        return
    devices = target_devices(args.topology) if args.topology else jax.devices()
    target = f"{args.topology} (one chip)" if args.topology else "XLA:CPU"
    flash = dsj.presets["deepseek-v4-flash"]
    print(f"\none V4-Flash-width layer's decode step, batch {args.batch}, bf16, {target}: bytes accessed added over a "
          f"{BASE}-token cache, compiler / by hand")
    for kind in (CSA, HCA):
        base = step_bytes(kind, BASE, args.batch, devices)
        for n in args.lengths:
            t0 = time.time()
            got = step_bytes(kind, n, args.batch, devices) - base
            hand = args.batch * (v4_layer_read(flash, kind, n) - v4_layer_read(flash, kind, BASE))
            print(f"{kind:>30} {n:>8}: {got / 2**20:>9.1f} MiB / {hand / 2**20:>9.1f} MiB ({got / hand:.3f})"
                  f"  [{time.time() - t0:.0f} s]", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"target": target, "kind": kind, "batch": args.batch, "cache": n,
                                        "base": base, "added": got, "hand_added": hand}) + "\n")


if __name__ == "__main__":
    main()
