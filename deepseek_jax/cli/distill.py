"""``deepseek-jax distill``: distill a teacher checkpoint into a student preset / config or a student checkpoint
(``--init-from``, fully or by LoRA adapters: ``--lora-rank``) (token-level KL on the fly or from precomputed top-k
shards, or sequence level on the teacher's answers); ``--precompute-teacher`` writes the shards."""

from __future__ import annotations

import os
import sys

LOSSES = {"forward": 0.0, "reverse": 1.0}


def _student_config(args):
    """The student's architecture: ``--init-from``'s checkpoint as it is (a ``--set`` may only repeat its own
    value), or ``--student-config`` / ``--student`` with the ``--set`` overrides."""
    from deepseek_jax.cli.common import parse_overrides
    from deepseek_jax.config.model import ModelConfig
    from deepseek_jax.config.presets import presets

    overrides = parse_overrides(args.set)
    if args.init_from is not None:
        from deepseek_jax.cli.common import checkpoint_config

        return checkpoint_config(args.init_from, overrides, "the student")
    config = ModelConfig.from_pretrained(args.student_config) if args.student_config else presets[args.student]
    if args.data in (None, "arithmetic"):
        from deepseek_jax.data.tasks.arithmetic import BOS_ID, EOS_ID

        overrides.setdefault("bos_token_id", BOS_ID)
        overrides.setdefault("eos_token_id", EOS_ID)
    return config.replace(**overrides)


def _run(args) -> int:
    from deepseek_jax.checkpoint.load import pretrained_config
    from deepseek_jax.checkpoint.safetensors_io import CheckpointError
    from deepseek_jax.cli.common import checkpoint_tokenizer_dir, data_tokenizer, lora_config
    from deepseek_jax.config.model import ConfigError
    from deepseek_jax.data.corpus import DataError
    from deepseek_jax.posttrain.distill import DistillConfig, check_vocab, distill
    from deepseek_jax.posttrain.teacher import load_teacher, precompute_teacher
    from deepseek_jax.training.config import TrainConfig

    try:
        mix = args.mix if args.loss == "mix" else LOSSES[args.loss]
        dc = DistillConfig(mix=mix, temperature=args.temperature, top_k=args.top_k, kl_weight=args.kl_weight,
                           ce_weight=args.ce_weight, teacher_precision=args.teacher_precision)
        tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                         warmup_steps=args.warmup, grad_accum=args.grad_accum, precision=args.precision,
                         seed=args.seed, mtp_weight=args.mtp_weight, **lora_config(args))
        # Text data is encoded with --tokenizer, else the student checkpoint's own tokenizer.
        tokenizer = data_tokenizer(args.data, args.tokenizer or checkpoint_tokenizer_dir(args.init_from))
        if args.precompute_teacher:
            if not args.teacher or not args.top_k:
                raise ValueError("--precompute-teacher needs --teacher and --top-k")
            from deepseek_jax.data.packing import make_dataset
            from deepseek_jax.parallel.mesh import make_mesh

            mesh = make_mesh(args.mesh)
            teacher_config, params = load_teacher(args.teacher, mesh)
            dataset = make_dataset(args.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed,
                                   tokenizer=tokenizer, arithmetic_loss=args.arithmetic_loss)
            precompute_teacher(teacher_config, params, dataset, tc.steps, args.precompute_teacher, top_k=args.top_k,
                               temperature=args.temperature, mesh=mesh, teacher_name=args.teacher,
                               options=tc.model_options(args.teacher_precision))
            print(f"wrote the teacher's top-{args.top_k} for {tc.steps} batches to {args.precompute_teacher}",
                  file=sys.stderr)
            return 0
        student = _student_config(args)
        student_name = args.init_from or args.student_config or args.student
        if args.teacher_shards is None:
            if not args.teacher:
                raise ValueError("give --teacher DIR or --teacher-shards DIR")
            # The vocabularies are compared before any weight is read.
            check_vocab(pretrained_config(args.teacher), student, args.teacher, student_name)
        records = distill(student, tc, dc, args.workdir, teacher=args.teacher if args.teacher_shards is None else None,
                          teacher_shards=args.teacher_shards, sequence_prompts=args.sequence_prompts, data=args.data,
                          tokenizer=tokenizer, arithmetic_loss=args.arithmetic_loss, mesh_spec=args.mesh,
                          save_every=args.save_every,
                          keep=args.keep, resume=not args.no_resume, student_name=student_name,
                          init_from=args.init_from)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records:
        last = records[-1]
        kl = f", KL {last['kl']:.4f}" if "kl" in last else ""
        print(f"step {last['step']}: CE {last['loss']:.4f}{kl}; metrics in "
              f"{os.path.join(args.workdir, 'metrics.jsonl')}", file=sys.stderr)
    if args.data in (None, "arithmetic"):
        from deepseek_jax.cli.common import report_arithmetic

        report_arithmetic(args.workdir)
    return 0


def register(sub) -> None:
    from deepseek_jax.cli.common import add_lora_args, add_run_arguments

    p = sub.add_parser("distill", help="distill a teacher checkpoint into a smaller (e.g. dense Qwen2/Llama) student")
    p.add_argument("--teacher", default=None, metavar="DIR",
                   help="the teacher: a train work directory, an HF or a converted checkpoint")
    p.add_argument("--teacher-shards", default=None, metavar="DIR",
                   help="train on the teacher's top-k precomputed by --precompute-teacher (no teacher in memory)")
    p.add_argument("--precompute-teacher", default=None, metavar="OUT",
                   help="write the teacher's top-k log-probabilities and ids for --steps batches to OUT and exit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--student", default="tiny-qwen2", help="the student's preset (default tiny-qwen2)")
    src.add_argument("--student-config", default=None, help="the student's config.json (or a directory with one)")
    src.add_argument("--init-from", default=None, metavar="DIR",
                     help="start the student from this checkpoint (HF, converted or a train work directory) with "
                          "its own config.json; its tokenizer.json is the default tokenizer; needed by --lora-rank")
    add_lora_args(p, default_help="the whole student trains")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="student config override, e.g. --set vocab_size=32 (repeatable)")
    p.add_argument("--loss", choices=("forward", "reverse", "mix"), default="forward",
                   help="forward KL(teacher||student), reverse KL(student||teacher) or (1-m) forward + m reverse")
    p.add_argument("--mix", type=float, default=0.5, help="m for --loss mix")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="the teacher's top-k ids plus a rest bucket (0: full vocab)")
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--teacher-precision", choices=("fp32", "bf16", "fp8"), default="fp32",
                   help="the teacher's compute precision, in the step and in --precompute-teacher alike (default "
                        "fp32, whatever --precision the student trains in)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token CE on the data's targets")
    p.add_argument("--sequence-prompts", type=int, default=0, metavar="N",
                   help="sequence-level: train on the teacher's greedy answers to N arithmetic questions "
                        "(with --kl-weight 0 --ce-weight 1: CE on the answers only)")
    p.add_argument("--data", default=None, help="'arithmetic' (default), or files as train's --data")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for text data (as train's --tokenizer)")
    p.add_argument("--arithmetic-loss", choices=("answers", "all"), default="answers")
    add_run_arguments(p, workdir="runs/distill", steps=600, lr=1e-2)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="a V3 student's MTP loss weight on the data")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,expert=2 (default: all devices on data)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
