"""``deepseek-jax plan``: compile the steps for a TPU topology or simulated devices and report per-device memory
and collectives; ``--capacity``: the inference capacity by hand."""

from __future__ import annotations

import json
import os

from deepseek_jax.cli.common import add_slice_args, parse_overrides


def _run(args) -> int:
    import sys

    if args.cpu_devices and not args.topology:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    if args.topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU; run nothing on one
    from deepseek_jax.config import ConfigError, ModelConfig, presets
    from deepseek_jax.tools.plan import PlanError, format_bytes, parse_bytes, plan

    if args.capacity:
        return _run_capacity(args)
    if args.batch is None or args.seq_len is None:
        print("error: --batch and --seq-len are needed to compile the steps (or --capacity alone)", file=sys.stderr)
        return 2
    try:
        config = ModelConfig.from_pretrained(args.model) if os.path.exists(args.model) else presets[args.model]
        config = config.replace(**parse_overrides(args.set))
        result = plan(config, mesh=args.mesh, batch=args.batch, seq_len=args.seq_len, cache_len=args.cache_len,
                      topology=args.topology, cpu_devices=args.cpu_devices, precision=args.precision,
                      remat=args.remat, steps=args.steps.split(","), model_name=args.model,
                      device_memory_bytes=parse_bytes(args.device_memory) if args.device_memory else None,
                      train_overrides={"fsdp_over_data": args.fsdp_over_data, "moe_dispatch": args.moe_dispatch,
                                       "capacity_factor": args.capacity_factor, "lora_rank": args.lora_rank,
                                       "lora_alpha": args.lora_alpha,
                                       # QLoRA: the frozen base as the FP8 release stores it
                                       "fp8_base": bool(args.lora_rank) and args.weight_dtype == "fp8"},
                      infer_dtype=args.infer_dtype, cache_dtype=args.cache_dtype,
                      weight_dtype="fp8" if args.weight_dtype == "fp8" else None,
                      num_slices=args.num_slices, dcn=args.dcn_mesh)
    except (PlanError, ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {str(e).strip(chr(39))}", file=sys.stderr)
        return 2
    print(result.table())
    out = result.to_dict()
    if any(s.name in ("prefill", "decode") for s in result.steps) and result.device_memory:
        cap = _capacity(config, args, result.mesh, result.device_memory)
        print("\n" + cap.table())
        out["inference_capacity"] = cap.to_dict()
    if args.json:
        _write_json(args.json, out)
    bad = [s for s in result.steps if not s.fits(result.device_memory)]
    if bad:
        s = bad[0]
        print(f"error: the {s.name} step does not fit: it needs {format_bytes(s.peak_bytes)} per device, "
              f"a {result.device_kind} device has {format_bytes(result.device_memory)}", file=sys.stderr)
        return 1
    return 0


def _capacity(config, args, mesh_sizes: dict, memory: int):
    from deepseek_jax.tools.capacity import (
        DEFAULT_CONTEXTS,
        DEFAULT_RESERVE,
        inference_capacity,
    )

    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else DEFAULT_CONTEXTS
    cache = args.cache_dtype or args.infer_dtype
    return inference_capacity(config, mesh_sizes, memory, weight_dtype=args.weight_dtype or args.infer_dtype,
                              cache_dtype=cache, reserve=DEFAULT_RESERVE if args.reserve is None else args.reserve,
                              contexts=contexts,
                              fsdp_over_data=args.fsdp_over_data)


def _run_capacity(args) -> int:
    """``--capacity``: the inference capacity by hand only: nothing compiled, no TPU compiler needed (a TPU
    topology is read by name: its chip count, and the chip's memory from ``tools/capacity.py``'s ``CHIP_MEMORY`` unless
    ``--device-memory``)."""
    import sys

    from deepseek_jax.config import ConfigError, ModelConfig, presets
    from deepseek_jax.parallel.mesh import parse_mesh_spec
    from deepseek_jax.tools.capacity import chip_memory, topology_chips
    from deepseek_jax.tools.plan import parse_bytes

    try:
        config = ModelConfig.from_pretrained(args.model) if os.path.exists(args.model) else presets[args.model]
        config = config.replace(**parse_overrides(args.set))
        if args.topology:
            generation, n = topology_chips(args.topology)
            n *= args.num_slices
            memory = chip_memory(generation)
            target = args.topology if args.num_slices == 1 else f"{args.num_slices} x {args.topology}"
        else:
            n, memory, target = args.cpu_devices, None, f"{args.cpu_devices} devices"
        if args.device_memory:
            memory = parse_bytes(args.device_memory)
        if memory is None:
            raise ValueError(f"the memory of a {target} device is not known here; pass --device-memory")
        cap = _capacity(config, args, parse_mesh_spec(args.mesh, n), memory)
    except (ConfigError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {str(e).strip(chr(39))}", file=sys.stderr)
        return 2
    print(f"{args.model} on {target}")
    print(cap.table())
    if args.json:
        _write_json(args.json, {"model": args.model, "target": target, "inference_capacity": cap.to_dict()})
    return 0


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def register(sub) -> None:
    p = sub.add_parser("plan", help="compile train / prefill / decode for a TPU topology or simulated devices; "
                                    "report per-device memory and collectives",
                       description="Compile the real steps from abstract shapes (nothing is allocated) and report, "
                                   "per device, arguments / temporaries / outputs against the device's memory and "
                                   "the collectives with their bytes. Exits 1 when a step does not fit.")
    p.add_argument("model", help="a preset (e.g. deepseek-v3) or a directory / file with config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set num_hidden_layers=4 (repeatable)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="a TPU topology, e.g. v5p:4x4x4 (needs the tpu extra)")
    target.add_argument("--cpu-devices", type=int, help="N simulated CPU devices")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8,expert=8 (default: every device on data)")
    add_slice_args(p)
    p.add_argument("--batch", type=int, default=None, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=None, help="training / prefill sequence length")
    p.add_argument("--cache-len", type=int, default=None, help="decode step's cache length (default: --seq-len)")
    p.add_argument("--steps", default="train,prefill,decode", help="which steps, comma-separated (default: all)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="bf16")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="the train step of a LoRA fine-tune (rank-R adapters on the default targets, the base frozen "
                        "in the compute dtype, or with --weight-dtype fp8 as the FP8 release stores it: QLoRA; "
                        "default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="LoRA's alpha (default 16)")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="full")
    p.add_argument("--fsdp-over-data", action="store_true", help="shard weights and optimizer state over data too")
    p.add_argument("--moe-dispatch", choices=("auto", "blocked", "ragged", "gather", "dense"), default="auto",
                   help="grouped GEMM of the routed experts (default: ragged on TPU, blocked elsewhere)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="drop rows past this capacity under expert parallelism (default: dropless)")
    p.add_argument("--infer-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="params and compute dtype of prefill / decode")
    p.add_argument("--cache-dtype", choices=("bfloat16", "float32", "fp8"), default=None)
    p.add_argument("--device-memory", default=None, help="override the device memory, e.g. 16GB")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--capacity", action="store_true",
                   help="only the inference capacity by hand (weights and latent cache per device, the largest "
                        "batch per context): no compile, no TPU compiler needed; also printed after compiled "
                        "prefill / decode steps")
    p.add_argument("--weight-dtype", choices=("bfloat16", "float32", "fp8"), default=None,
                   help="weights at this dtype in the capacity table and, for fp8, in the compiled prefill / decode "
                        "steps and a LoRA train step's frozen base too (e4m3 + 128x128 block scales, as the FP8 "
                        "release stores them and "
                        "load_pretrained(..., dtype='fp8') keeps them; V4's routed experts FP4 as its release stores "
                        "them; default --infer-dtype)")
    p.add_argument("--contexts", default=None, help="capacity: context lengths, comma-separated "
                                                     "(default 4096,8192,32768,131072)")
    p.add_argument("--reserve", type=float, default=None,
                   help="capacity: fraction of device memory kept for the step's temporaries (default 0.15, "
                        "measured for V3 decode on v5p)")
    p.set_defaults(func=_run)
