"""``deepseek-jax convert`` and ``deepseek-jax export`` (registered from ``cli/__init__.py``)."""

from __future__ import annotations

import logging
import sys
import warnings

from deepseek_jax.checkpoint.safetensors_io import CheckpointError
from deepseek_jax.config.model import ConfigError

# Bad input or a failing disk: one line naming the file and tensor, exit status 1 (argparse uses 2 for bad usage).
_INPUT_ERRORS = (CheckpointError, ConfigError, OSError, ValueError, RuntimeError)


def _fail(e: BaseException) -> int:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _quiet():
    """One-line warnings; Orbax's informational absl logging off (errors are reported by us)."""
    warnings.showwarning = _warn_one_line
    logging.getLogger("absl").setLevel(logging.ERROR)


def _convert(args) -> int:
    from deepseek_jax.checkpoint.convert.convert import (
        convert,
        describe_plan,
        open_source,
        plan,
    )

    _quiet()
    try:
        if args.dry_run:
            source = open_source(args.src, args.config)
            print(describe_plan(source, plan(source, args.dtype, args.keep_fp8)))
            return 0
        r = convert(args.src, args.dst, dtype=args.dtype, keep_fp8=args.keep_fp8, config_file=args.config,
                    progress=not args.no_progress, force=args.force)
        gbps = r["bytes"] / max(r["seconds"], 1e-9) / 1e9
        print(f"converted {args.src} -> {args.dst}: {r['bytes'] / 1e9:.3f} GB in {r['seconds']:.1f} s "
              f"({gbps:.2f} GB/s)")
        if args.verify:
            from deepseek_jax.checkpoint.convert.verify import verify

            diff = verify(args.dst, args.src, args.config)
            print(f"verify: max |logits(deepseek-jax) - logits(transformers)| = {diff:.3e}")
    except _INPUT_ERRORS as e:
        return _fail(e)
    return 0


def _export(args) -> int:
    from deepseek_jax.checkpoint.convert.export import export

    _quiet()
    try:
        if args.adapter:
            from deepseek_jax.checkpoint.adapters import export_adapter

            r = export_adapter(args.src, args.dst, force=args.force)
            print(f"exported the adapters of {args.src} -> {args.dst} (PEFT): {r['tensors']} tensors, "
                  f"{r['values']:,} values")
            return 0
        r = export(args.src, args.dst, fp8=args.fp8, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   ue8m0=True if args.ue8m0 else None, progress=not args.no_progress, force=args.force)
        print(f"exported {args.src} -> {args.dst}: {r['tensors']} tensors, {r['bytes'] / 1e9:.3f} GB in "
              f"{r['seconds']:.1f} s")
        if args.verify:
            from deepseek_jax.checkpoint.convert.verify import verify

            diff = verify(args.src, args.dst)
            print(f"verify: max |logits(deepseek-jax) - logits(transformers)| = {diff:.3e}")
    except _INPUT_ERRORS as e:
        return _fail(e)
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="HF / PyTorch checkpoint (FP8 releases included) -> Orbax, streaming",
                       description="Convert an HF directory (config.json + safetensors, sharded or not; fp32, bf16, "
                                   "fp16 or FP8 with 128x128 block scales) or a PyTorch state dict (.bin/.pt/.pth) "
                                   "to an Orbax checkpoint of the params tree, one tensor at a time.")
    p.add_argument("src", help="checkpoint directory, or a .safetensors/.bin/.pt/.pth file")
    p.add_argument("dst", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="params dtype (default bfloat16)")
    p.add_argument("--keep-fp8", action="store_true", help="keep FP8 weights and their block scales as stored")
    p.add_argument("--config", help="config.json to use (default: the one beside SRC)")
    p.add_argument("--dry-run", action="store_true", help="print the mapping, shapes and sizes; write nothing")
    p.add_argument("--verify", action="store_true",
                   help="afterwards compare our logits with transformers' on a few prompts (needs torch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)

    e = sub.add_parser("export", help="converted Orbax directory -> HF safetensors shards that transformers loads",
                       description="Write HF safetensors shards, index and config.json from a `deepseek-jax convert` "
                                   "directory or a train work directory (a LoRA run's: merged, or with --adapter its "
                                   "adapters in PEFT's format).")
    e.add_argument("src", help="a directory written by `deepseek-jax convert`")
    e.add_argument("dst", help="output directory (must not exist unless --force)")
    e.add_argument("--fp8", action="store_true", help="re-quantize to DeepSeek's FP8 release format "
                                                      "(e4m3fn + 128x128 weight_scale_inv)")
    e.add_argument("--ue8m0", action="store_true", help="with --fp8: power-of-two scales (V3.1 scale_fmt ue8m0)")
    e.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="dtype of non-FP8 tensors (default: as stored)")
    e.add_argument("--max-shard-size", default="5GB", help="largest shard file (default 5GB)")
    e.add_argument("--verify", action="store_true", help="afterwards compare transformers on DST with our model")
    e.add_argument("--adapter", action="store_true",
                   help="a LoRA work directory's adapters only, as a PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors) for peft.PeftModel.from_pretrained")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--force", action="store_true", help="replace DST if it exists")
    e.set_defaults(func=_export)
