"""``deepseek-jax train``: train a preset (or a config.json) on the built-in data or your own, or fine-tune a
checkpoint (``--init-from``: HF safetensors, FP8 releases included, a converted directory or a train work
directory), e.g. supervised on chat ``.jsonl`` with the loss on the assistant's tokens only."""

from __future__ import annotations

import os
import sys

from deepseek_jax.cli.common import (
    add_lora_args,
    add_run_arguments,
    add_slice_args,
    checkpoint_config,
    checkpoint_tokenizer_dir,
    data_tokenizer,
    lora_config,
    parse_overrides,
    report_arithmetic,
)


def _model_and_tokenizer(args):
    """``(config, tokenizer, tokenizer_file)`` of the run: the architecture (``--init-from``'s checkpoint, a
    config.json or a preset, with ``--set`` overrides) and the tokenizer its data is encoded with."""
    from deepseek_jax.config.model import ModelConfig
    from deepseek_jax.config.presets import presets

    overrides = parse_overrides(args.set)
    tokenizer_file = args.tokenizer
    if args.init_from is not None:  # the checkpoint's config as it is: its vocabulary must hold the data's
        config, overrides = _init_config(args, overrides), {}
        tokenizer_file = tokenizer_file or checkpoint_tokenizer_dir(args.init_from)
    else:
        config = ModelConfig.from_pretrained(args.config) if args.config else presets[args.preset or DEFAULT_PRESET]
    tokenizer = data_tokenizer(args.data, tokenizer_file)
    if args.init_from is None and args.data in (None, "arithmetic"):  # the built-in vocabulary's BOS / EOS
        from deepseek_jax.data.tasks.arithmetic import BOS_ID, EOS_ID

        overrides.setdefault("bos_token_id", BOS_ID)
        overrides.setdefault("eos_token_id", EOS_ID)
    if tokenizer is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = max(config.vocab_size, tokenizer.get_vocab_size())
    try:
        config = config.replace(**overrides)
    except TypeError as e:
        raise ValueError(f"--set: {e}") from None
    return config, tokenizer, tokenizer_file


def _train_config(args):
    from deepseek_jax.training.config import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                       warmup_steps=args.warmup, grad_accum=args.grad_accum, precision=args.precision,
                       remat=args.remat, seed=args.seed, mtp_weight=args.mtp_weight,
                       bias_update_rate=args.bias_update_rate, bf16_moments=args.bf16_moments,
                       optimizer=args.optimizer,
                       balance_alpha=args.balance_alpha, fsdp_over_data=args.fsdp_over_data,
                       capacity_factor=args.capacity_factor, train_only=tuple(args.train_only),
                       freeze=tuple(args.freeze), indexer_stage=args.indexer_stage,
                       indexer_loss_weight=args.indexer_loss_weight, **lora_config(args))


def _copy_tokenizer_config(args, tokenizer_file) -> None:
    """When the run encodes with its checkpoint's own tokenizer, that tokenizer's BOS / EOS names and chat template
    travel with the weights (export copies them on)."""
    tok_dir = checkpoint_tokenizer_dir(args.init_from)
    if tok_dir is not None and tokenizer_file == tok_dir and \
            os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        import shutil

        shutil.copy2(os.path.join(tok_dir, "tokenizer_config.json"),
                     os.path.join(args.workdir, "tokenizer_config.json"))


def _run(args) -> int:
    from deepseek_jax.parallel.mesh import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import jax

    from deepseek_jax.checkpoint.safetensors_io import CheckpointError
    from deepseek_jax.config.model import ConfigError
    from deepseek_jax.data.chat_template import default_style
    from deepseek_jax.data.corpus import DataError
    from deepseek_jax.parallel.mesh import make_mesh
    from deepseek_jax.training.run import fit

    try:
        config, tokenizer, tokenizer_file = _model_and_tokenizer(args)
        adapters = None
        if args.adapter is not None:  # a PEFT adapter to start from: its rank, alpha and targets make the run's LoRA
            from deepseek_jax.checkpoint.adapters import read_peft_adapter

            if args.init_from is None:
                raise ValueError("--adapter DIR needs --init-from BASE: the checkpoint the adapter was trained on")
            if args.lora_rank or args.lora_targets:
                raise ValueError("--adapter DIR: the adapter sets the LoRA rank and targets; drop --lora-rank / "
                                 "--lora-targets")
            adapters, rank, targets = read_peft_adapter(args.adapter, config)
            args.lora_rank, args.lora_alpha, args.lora_targets = rank, float(rank), list(targets)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tc = _train_config(args)
    # Pre-tokenized 1-D .npy data is split into documents at EOS: --eos-id, else the tokenizer's, else the
    # model config's.
    eos_id = args.eos_id if args.eos_id is not None else (config.eos_token_id if tokenizer is None else None)
    os.makedirs(args.workdir, exist_ok=True)
    _copy_tokenizer_config(args, tokenizer_file)
    try:
        mesh = make_mesh(args.mesh, num_slices=args.num_slices, dcn=args.dcn_mesh)
        records = fit(config, tc, args.workdir, mesh=mesh, data=args.data, tokenizer=tokenizer,
                      eos_id=eos_id, arithmetic_loss=args.arithmetic_loss, save_every=args.save_every,
                      keep=args.keep, resume=not args.no_resume, init_from=args.init_from,
                      chat_style=args.chat_style or default_style(config), pipeline=args.pipeline,
                      data_workers=args.data_workers, adapters=adapters)
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
    if args.data in (None, "arithmetic") and jax.process_index() == 0:
        report_arithmetic(args.workdir)
    return 0


DEFAULT_PRESET = "tiny-v3-arith"


def _init_config(args, overrides: dict):
    """The architecture of ``--init-from``'s checkpoint; ``--preset`` / ``--config`` cannot be given with it, and a
    ``--set`` may only repeat the checkpoint's own value."""
    if args.preset is not None or args.config is not None:
        flag = "--preset" if args.preset is not None else "--config"
        raise ValueError(f"{flag} cannot be combined with --init-from: the architecture comes from "
                         f"{os.path.join(args.init_from, 'config.json')}")
    return checkpoint_config(args.init_from, overrides, "a fine-tuning run")


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
    add_lora_args(p, extras=True)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="with --init-from: start LoRA from this PEFT adapter directory (peft's own, or `export "
                        "--adapter`'s); its rank, alpha and targets make the run's")
    p.add_argument("--chat-style", choices=("v3", "r1", "v2"), default=None,
                   help="template for chat .jsonl data ({\"messages\": [...]} per line; default: v2 for V2 models, "
                        "else v3); the loss is on the assistant's tokens only")
    p.add_argument("--config", help="a config.json (or a directory with one) instead of a preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set num_hidden_layers=4 (repeatable)")
    p.add_argument("--data", default=None,
                   help="'arithmetic' (default), or .txt/.jsonl/.npy files, a directory or a glob; with --pipeline "
                        "grain also .parquet and .array_record files (text, chats or input_ids) and mixtures, "
                        "'web/*.jsonl:0.7,code/:0.3' (documents drawn by weight)")
    p.add_argument("--pipeline", choices=("memory", "grain"), default="memory",
                   help="how the data is fed: tokenized up front into memory (default), or streamed by Grain, "
                        "documents read and tokenized as the batches need them")
    p.add_argument("--data-workers", type=int, default=0, metavar="N",
                   help="--pipeline grain: Grain worker processes that read, tokenize and pack (default 0: in "
                        "the training process)")
    p.add_argument("--arithmetic-loss", choices=("answers", "all"), default="answers",
                   help="built-in data: the loss on the answer characters only (default) or on every token")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory with one) for text data (default: the DeepSeek tokenizer)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="the id that ends each document of a 1-D .npy (default: the model config's eos_token_id)")
    add_run_arguments(p, workdir="runs/tiny-v3", steps=3000, lr=3e-3)
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none")
    p.add_argument("--mtp-weight", type=float, default=0.3,
                   help="weight of the MTP loss; 0 turns it off (the MTP modules are then frozen)")
    p.add_argument("--no-mtp", dest="mtp_weight", action="store_const", const=0.0, help="same as --mtp-weight 0")
    p.add_argument("--bias-update-rate", type=float, default=0.001)
    p.add_argument("--balance-alpha", type=float, default=None,
                   help="weight of the balance loss (default: 0.0001 for aux-loss-free noaux_tc models, as in the "
                        "DeepSeek-V3 paper; the config's aux_loss_alpha for V2 routers)")
    p.add_argument("--indexer-stage", choices=("warmup", "sparse"), default=None,
                   help="DeepSeek-V3.2: train the lightning indexer by its KL to the attention, alone on dense "
                        "attention (warmup) or with everything on top-k attention (sparse)")
    p.add_argument("--indexer-loss-weight", type=float, default=1.0, help="weight of the indexer's KL")
    p.add_argument("--bf16-moments", action="store_true")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="muon: Muon (orthogonalized momentum) for the hidden linear weights and AdamW for the "
                        "embedding, head, routers, norms and biases, as DeepSeek-V4 was pre-trained")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,expert=2 (default: all devices on data)")
    add_slice_args(p)
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
