"""Per-chip memory and collectives of DeepSeek-V3 (or V3.2) steps compiled for TPU topologies we do not have.

    pip install -e ".[tpu]"          # libtpu: the real TPU compiler, running on this CPU
    JAX_PLATFORMS=cpu python bench/plan_tpu.py --case v3x4 --seq 1024 4096
    JAX_PLATFORMS=cpu python bench/plan_tpu.py --case v3-full --seq 4096 --steps train
    JAX_PLATFORMS=cpu python bench/plan_tpu.py --model deepseek-v3.2 --case v3x4 --seq 32768 \
        --mesh expert=8,context=8 --steps train

Cases (the yardstick of the scale issues, bench/RESULTS.md):
  v3x4     DeepSeek-V3 cut to 4 layers (3 dense + 1 MoE) plus its MTP module, v5p:4x4x4 (64 chips),
           mesh fsdp=8,expert=8, global batch 64 sequences, bf16 compute, fp32 master weights and Adam moments,
           full remat. Anchor, quoted and not reproduced in this repository: MaxText 0.2.5 compiled for the same
           topology and model, as reported in issue 10 (2026-11), gave 23.7 GB at 64 x 1024, 45.1 GB at 64 x 4096.
  v3x4-moe the same with first_k_dense_replace=1: 1 dense + 3 MoE layers plus the MTP module (MoE), so the
           expert dispatch dominates the step.
  v3-full  the whole 671B model (61 layers + MTP) on v5p:8x8x8 (512 chips), mesh fsdp=64,expert=8.

The cases cut the ``--model`` preset (default deepseek-v3; deepseek-v3.2 is the same model plus its lightning
indexer, index_topk 2048), so V3.2 and V3 compile on the same topology, mesh and batch. DeepSeek-V4
(``--model deepseek-v4-flash``) is cut to its first layers (v3x4: three hash-routed HCA layers and one CSA layer
with a learned router; no MTP module, which V4 does not build here); v3-full is the whole model.

Each (case, sequence length) is compiled by ``deepseek_jax.plan.plan`` and printed as its table plus one JSON
line (``--json FILE`` appends them to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import deepseek_jax as dsj  # noqa: E402
from deepseek_jax.tools.plan import plan  # noqa: E402

CASES = {
    "v3x4": dict(overrides={"num_hidden_layers": 4}, topology="v5p:4x4x4", mesh="fsdp=8,expert=8", batch=64),
    "v3x4-moe": dict(overrides={"num_hidden_layers": 4, "first_k_dense_replace": 1}, topology="v5p:4x4x4",
                     mesh="fsdp=8,expert=8", batch=64),
    "v3-full": dict(overrides={}, topology="v5p:8x8x8", mesh="fsdp=64,expert=8", batch=512),
}


def cut(config, overrides: dict):
    """The preset with the case's overrides; a V4 preset cut to fewer layers keeps the first layers' kinds (its
    ``layer_types`` / ``mlp_layer_types``), and the V3-only ``first_k_dense_replace`` does not apply to it."""
    overrides = dict(overrides)
    if config.is_v4:
        overrides.pop("first_k_dense_replace", None)
        n = overrides.get("num_hidden_layers")
        if n is not None:
            overrides.update(layer_types=config.layer_types[:n], mlp_layer_types=config.mlp_layer_types[:n])
    return config.replace(**overrides)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(dsj.presets), default="deepseek-v3", metavar="PRESET",
                   help="the preset the case cuts (default deepseek-v3; deepseek-v3.2 adds the indexer)")
    p.add_argument("--case", choices=sorted(CASES), default="v3x4")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--steps", default="train", help="comma-separated: train,prefill,decode")
    p.add_argument("--batch", type=int, default=None, help="override the case's global batch")
    p.add_argument("--mesh", default=None, help="override the case's mesh")
    p.add_argument("--topology", default=None, help="override the case's topology")
    p.add_argument("--cache-len", type=int, default=None)
    p.add_argument("--keep-received", action="store_true",
                   help="TrainConfig.moe_keep_received: layers outside remat (MTP) keep their exchanges' rows")
    p.add_argument("--json", default=None, help="append the figures, one JSON object per line")
    args = p.parse_args()
    case = CASES[args.case]
    config = cut(dsj.presets[args.model], case["overrides"])
    for seq in args.seq:
        t0 = time.time()
        result = plan(config, mesh=args.mesh or case["mesh"], batch=args.batch or case["batch"], seq_len=seq,
                      cache_len=args.cache_len, topology=args.topology or case["topology"], precision="bf16",
                      remat="full", steps=args.steps.split(","), model_name=f"{args.model} ({args.case})",
                      train_overrides={"moe_keep_received": True} if args.keep_received else None)
        print(result.table())
        print(f"[{time.time() - t0:.0f} s]\n")
        record = {"preset": args.model, "case": args.case, "seq": seq, "keep_received": args.keep_received,
                  **result.to_dict()}
        print("JSON " + json.dumps(record))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
