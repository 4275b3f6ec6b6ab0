"""Bytes a decode step reads: DeepSeek-V3.2's sparse attention against V3's dense absorbed attention, at long caches.

    pip install -e ".[tpu]"
    JAX_PLATFORMS=cpu python bench/decode_bytes.py --topology v5p:2x2x1      # the TPU compiler (one v5p chip)
    python bench/decode_bytes.py                                              # XLA:CPU

One decode step (one new token per sequence, ``--batch`` sequences) of one layer at DeepSeek-V3.2's full width
(hidden 7168, 128 heads, latent 512 + 64, indexer 64 heads x 128, dense MLP, a 1,024-token vocabulary so that the
output head does not dominate) is compiled twice on the same weights: as V3.2 (the indexer picks ``index_topk``
= 2048 of the cached tokens, attention reads those latent rows) and as V3 (absorbed attention over every cached
row). Reported per cache length: ``bytes accessed`` from the compiled step's ``cost_analysis()`` (one compile per
case; the attention block is the cache length, so no loop hides trips from the count), the same less the step at
a 2,048-token cache (what the longer cache adds), and the cache bytes by hand:
- dense absorbed: ``S x (512 + 64)`` latent values per sequence and layer;
- sparse: the indexer's keys, ``S x 128`` values, plus ``min(2048, S) x (512 + 64)`` gathered latent values.
The cache is bf16 (the FP8 latent cache halves both; DeepSeek keeps the indexer keys in FP8 with one scale per
128 values, which this implementation does not yet do).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.inference.steps import decode_core  # noqa: E402
from deepseek_jax.parallel.mesh import make_mesh  # noqa: E402
from deepseek_jax.tools.plan import _inference_inputs, target_devices  # noqa: E402

BASE = 2048


def config_for(sparse: bool):
    return dsj.presets["deepseek-v3.2"].replace(
        model_type="deepseek_v32" if sparse else "deepseek_v3", num_hidden_layers=1, first_k_dense_replace=1,
        num_nextn_predict_layers=0, vocab_size=1024)


def step_bytes(sparse: bool, cache_len: int, batch: int, devices) -> float:
    return decode_step_bytes(config_for(sparse), cache_len, batch, devices)


def decode_step_bytes(config, cache_len: int, batch: int, devices) -> float:
    """``bytes accessed`` of one compiled decode step of ``config`` (bf16, one device, an empty cache of
    ``cache_len`` tokens for ``batch`` sequences)."""
    options = dsj.ModelOptions(dtype="bfloat16", param_dtype="bfloat16", attention_block=cache_len,
                               platform=devices[0].platform)
    mesh = make_mesh(None, devices[:1])
    params, cache = _inference_inputs(config, options, mesh, batch, cache_len, "bfloat16")
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    compiled = jax.jit(functools.partial(decode_core, config=config, options=options),
                       donate_argnums=(1,)).lower(params, cache, tokens, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"])


def by_hand(sparse: bool, cache_len: int, batch: int) -> float:
    c = config_for(True)
    latent = c.kv_lora_rank + c.qk_rope_head_dim
    if not sparse:
        return 2.0 * batch * cache_len * latent
    return 2.0 * batch * (cache_len * c.index_head_dim + min(c.index_topk, cache_len) * latent)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--topology", default=None, help="a TPU topology (the tpu extra); default: this CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = target_devices(args.topology) if args.topology else jax.devices()
    target = f"{args.topology} (one chip)" if args.topology else "XLA:CPU"
    base = {s: step_bytes(s, BASE, args.batch, devices) for s in (True, False)}
    print(f"decode step, one layer of V3.2's width, batch {args.batch}, bf16, {target}")
    print(f"{'cache':>7} {'sparse GB':>10} {'dense GB':>9} {'ratio':>6} {'added sparse':>13} {'added dense':>12} "
          f"{'ratio':>6} {'by hand: sparse / dense MB':>27} {'ratio':>6}")
    for s_len in args.lengths:
        t0 = time.time()
        sp, de = (step_bytes(s, s_len, args.batch, devices) for s in (True, False))
        add_sp, add_de = sp - base[True], de - base[False]
        h_sp, h_de = by_hand(True, s_len, args.batch), by_hand(False, s_len, args.batch)
        print(f"{s_len:>7} {sp / 1e9:>10.3f} {de / 1e9:>9.3f} {sp / de:>6.3f} {add_sp / 1e9:>13.3f} "
              f"{add_de / 1e9:>12.3f} {add_sp / add_de:>6.3f} {h_sp / 1e6:>13.1f} / {h_de / 1e6:<11.1f} "
              f"{h_sp / h_de:>6.3f}  [{time.time() - t0:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"target": target, "batch": args.batch, "cache": s_len, "sparse_bytes": sp,
                                    "dense_bytes": de, "base_sparse": base[True], "base_dense": base[False],
                                    "hand_sparse": h_sp, "hand_dense": h_de}) + "\n")


if __name__ == "__main__":
    main()
