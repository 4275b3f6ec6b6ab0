"""``deepseek-jax train``: train a preset (or a config.json) on the built-in data or your own, or fine-tune a
checkpoint (``--init-from``: HF safetensors, FP8 releases included, a converted directory or a train work
directory), e.g. supervised on chat ``.jsonl`` with the loss on the assistant's tokens only."""

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


def _checkpoint_tokenizer_dir(init_from):
    """Where the tokenizer files of checkpoint ``init_from`` are (a converted directory keeps them in
    ``hf_files/``), or None when it has no ``tokenizer.json``."""
    if init_from is None:
        return None
    for d in (init_from, os.path.join(init_from, "hf_files")):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


def _data_tokenizer(data, tokenizer_file):
    """The ``tokenizers.Tokenizer`` that text data is encoded with (``tokenizer_file``, else the DeepSeek
    tokenizer), or None for the built-in data and for sources that are all pre-tokenized ``.npy`` (unless a
    tokenizer is given: its EOS then splits 1-D files)."""
    if data in (None, "arithmetic"):
        return None
    from .data import expand_source

    if tokenizer_file is None and all(p.endswith(".npy") for p in expand_source(data)):
        return None
    from tokenizers import Tokenizer

    from .tokenizer import default_tokenizer_path

    path = tokenizer_file if tokenizer_file else str(default_tokenizer_path())
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers error does not name the file
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


def _run(args) -> int:
    from .sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    from .config import ConfigError, ModelConfig, presets
    from .data import DataError
    from .safetensors_io import CheckpointError
    from .train import TrainConfig, fit

    overrides = _parse_overrides(args.set)
    tokenizer_file = args.tokenizer
    if args.init_from is not None:
        try:
            config = _init_config(args, overrides)
        except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        overrides = {}
        if tokenizer_file is None:
            tokenizer_file = _checkpoint_tokenizer_dir(args.init_from)
    else:
        config = ModelConfig.from_pretrained(args.config) if args.config else presets[args.preset or DEFAULT_PRESET]
    try:
        tokenizer = _data_tokenizer(args.data, tokenizer_file)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.init_from is not None:
        pass  # the checkpoint's config as it is: its vocabulary must hold the data's (fit checks)
    elif args.data in (None, "arithmetic"):  # the built-in vocabulary's BOS / EOS, for generation later
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
                     bias_update_rate=args.bias_update_rate, bf16_moments=args.bf16_moments,
                     balance_alpha=args.balance_alpha, fsdp_over_data=args.fsdp_over_data,
                     capacity_factor=args.capacity_factor, train_only=tuple(args.train_only),
                     freeze=tuple(args.freeze))
    # Pre-tokenized 1-D .npy data is split into documents at EOS: --eos-id, else the tokenizer's, else the
    # model config's.
    eos_id = args.eos_id if args.eos_id is not None else (config.eos_token_id if tokenizer is None else None)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with open(os.path.join(args.workdir, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(tc), f, indent=2)
    tok_dir = _checkpoint_tokenizer_dir(args.init_from)
    if tok_dir is not None and tokenizer_file == tok_dir and \
            os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        # The checkpoint's own tokenizer: its BOS / EOS names and chat template travel with the weights (export
        # copies them on).
        import shutil

        shutil.copy2(os.path.join(tok_dir, "tokenizer_config.json"),
                     os.path.join(args.workdir, "tokenizer_config.json"))
    from .chat import default_style

    try:
        from .train import Trainer
        from .sharding import make_mesh

        import jax

        trainable, total = Trainer(config, tc, make_mesh(args.mesh)).trainable_count()
        if jax.process_index() == 0:
            print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})", file=sys.stderr)
        records = fit(config, tc, args.workdir, mesh_spec=args.mesh, data=args.data, tokenizer=tokenizer,
                      eos_id=eos_id, arithmetic_loss=args.arithmetic_loss, save_every=args.save_every,
                      keep=args.keep, resume=not args.no_resume, init_from=args.init_from,
                      chat_style=args.chat_style or default_style(config))
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records:
        first, last = records[0], records[-1]
        print(f"step {first['step']}: loss {first['loss']:.4f} -> step {last['step']}: loss {last['loss']:.4f}; "
              f"metrics in {os.path.join(args.workdir, 'metrics.jsonl')}, curve in "
              f"{os.path.join(args.workdir, 'loss.png')}")
    import jax

    if args.data in (None, "arithmetic") and jax.process_index() == 0:
        _report_arithmetic(args.workdir)
    return 0


DEFAULT_PRESET = "tiny-v3-arith"


def _init_config(args, overrides: dict):
    """The architecture of ``--init-from``'s checkpoint; ``--preset`` / ``--config`` cannot be given with it, and a
    ``--set`` may only repeat the checkpoint's own value."""
    from .checkpoint import pretrained_config

    if args.preset is not None or args.config is not None:
        flag = "--preset" if args.preset is not None else "--config"
        raise ValueError(f"{flag} cannot be combined with --init-from: the architecture comes from "
                         f"{os.path.join(args.init_from, 'config.json')}")
    if not os.path.isdir(args.init_from):
        raise FileNotFoundError(f"--init-from {args.init_from}: no such directory")
    config = pretrained_config(args.init_from)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"--set {key}: not a config field")
        if getattr(config, key) != value:
            raise ValueError(f"--set {key}={value!r} conflicts with --init-from {args.init_from} ({key} = "
                             f"{getattr(config, key)!r}): a fine-tuning run keeps the checkpoint's architecture")
    return config


def _report_arithmetic(workdir: str) -> None:
    """What the model learned: exact greedy answers on held-out sums, and a few of them."""
    from .train import evaluate_arithmetic, load_train_checkpoint

    config, params = load_train_checkpoint(workdir)
    report = evaluate_arithmetic(config, params)
    print(f"held-out arithmetic: {report['exact']:.1%} of {report['answers']} answers exactly right "
          f"(greedy decoding)")
    for question, answer, truth in report["samples"]:
        mark = "ok" if answer == truth else f"wrong, {truth}"
        print(f"  {question}{answer}   ({mark})")


def add_run_arguments(p, *, workdir: str, steps: int) -> None:
    """The flags every training-like command (train, distill) shares: where, how long, batch and optimizer."""
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (built-in arithmetic data by default), or fine-tune one")
    p.add_argument("--preset", default=None,
                   help="a preset name (default tiny-v3-arith: tiny-v3 with 8 wider experts and a 32-id vocabulary)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="fine-tune: start from this checkpoint (HF safetensors incl. FP8, a converted directory or a "
                        "train work directory) with its own config.json; its tokenizer.json is the default tokenizer")
    p.add_argument("--train-only", action="append", default=[], metavar="GLOB",
                   help="update only params whose '/'-joined path matches, e.g. '*experts*' (repeatable)")
    p.add_argument("--freeze", action="append", default=[], metavar="GLOB",
                   help="never update params whose path matches, e.g. 'embed_tokens/*' (repeatable)")
    p.add_argument("--chat-style", choices=("v3", "r1", "v2"), default=None,
                   help="template for chat .jsonl data ({\"messages\": [...]} per line; default: v2 for V2 models, "
                        "else v3); the loss is on the assistant's tokens only")
    p.add_argument("--config", help="a config.json (or a directory with one) instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set num_hidden_layers=4 (repeatable)")
    p.add_argument("--data", default=None,
                   help="'arithmetic' (default), or .txt/.jsonl/.npy files, a directory or a glob")
    p.add_argument("--arithmetic-loss", choices=("answers", "all"), default="answers",
                   help="built-in data: the loss on the answer characters only (default) or on every token")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory with one) for text data (default: the DeepSeek tokenizer)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="the id that ends each document of a 1-D .npy (default: the model config's eos_token_id)")
    add_run_arguments(p, workdir="runs/tiny-v3", steps=1200)
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none")
    p.add_argument("--mtp-weight", type=float, default=0.3,
                   help="weight of the MTP loss; 0 turns it off (the MTP modules are then frozen)")
    p.add_argument("--no-mtp", dest="mtp_weight", action="store_const", const=0.0, help="same as --mtp-weight 0")
    p.add_argument("--bias-update-rate", type=float, default=0.001)
    p.add_argument("--balance-alpha", type=float, default=None,
                   help="weight of the balance loss (default: 0.0001 for aux-loss-free noaux_tc models, as in the "
                        "DeepSeek-V3 paper; the config's aux_loss_alpha for V2 routers)")
    p.add_argument("--bf16-moments", action="store_true")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,expert=2 (default: all devices on data)")
    p.add_argument("--fsdp-over-data", action="store_true",
                   help="shard weights and optimizer state over data too (ZeRO-3), not only fsdp x expert")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert parallelism: drop rows past this capacity per peer (default: dropless)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the workdir has checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=_run)
