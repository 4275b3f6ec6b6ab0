"""``deepseek-jax train``: train a preset (or a config.json) on the built-in data or your own."""

from __future__ import annotations

import dataclasses
import json
import os
import sys


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run(args) -> int:
    from .sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from .config import ConfigError, ModelConfig, presets
    from .data import DataError
    from .train import TrainConfig, fit

    config = ModelConfig.from_pretrained(args.config) if args.config else presets[args.preset]
    tokenizer = None
    if args.data and args.data != "arithmetic" and not args.data.endswith(".npy"):
        from .tokenizer import load_tokenizer

        if args.tokenizer and os.path.isfile(args.tokenizer):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(args.tokenizer)
        else:
            tokenizer = load_tokenizer(args.tokenizer)
    overrides = _parse_overrides(args.set)
    if args.data in (None, "arithmetic"):  # the built-in vocabulary's BOS / EOS, for generation later
        from .data import BOS_ID, EOS_ID

        overrides.setdefault("bos_token_id", BOS_ID)
        overrides.setdefault("eos_token_id", EOS_ID)
    if tokenizer is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = max(config.vocab_size, tokenizer.get_vocab_size())
    try:
        config = config.replace(**overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:
        print(f"error: --set: {e}", file=sys.stderr)
        return 2
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                     warmup_steps=args.warmup, grad_accum=args.grad_accum, precision=args.precision,
                     remat=args.remat, seed=args.seed, mtp_weight=args.mtp_weight,
                     bias_update_rate=args.bias_update_rate, bf16_moments=args.bf16_moments)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with open(os.path.join(args.workdir, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(tc), f, indent=2)
    try:
        records = fit(config, tc, args.workdir, mesh_spec=args.mesh, data=args.data, tokenizer=tokenizer,
                      save_every=args.save_every, keep=args.keep, resume=not args.no_resume)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if records:
        first, last = records[0], records[-1]
        print(f"step {first['step']}: loss {first['loss']:.4f} -> step {last['step']}: loss {last['loss']:.4f}; "
              f"metrics in {os.path.join(args.workdir, 'metrics.jsonl')}, curve in "
              f"{os.path.join(args.workdir, 'loss.png')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (built-in arithmetic data by default)")
    p.add_argument("--preset", default="tiny-v3", help="a preset name (default tiny-v3)")
    p.add_argument("--config", help="a config.json (or a directory with one) instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set num_hidden_layers=4 (repeatable)")
    p.add_argument("--data", default=None,
                   help="'arithmetic' (default), or .txt/.jsonl/.npy files, a directory or a glob")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the DeepSeek tokenizer)")
    p.add_argument("--workdir", default="runs/tiny-v3")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none")
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-update-rate", type=float, default=0.001)
    p.add_argument("--bf16-moments", action="store_true")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,expert=2 (default: all devices on data)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the workdir has checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=_run)
