"""Pieces every training-like subcommand (train, distill, grpo, plan) shares: config overrides, the shared flags,
the tokenizer of the data, and the arithmetic report."""

from __future__ import annotations

import json
import os


def parse_overrides(pairs: list[str]) -> dict:
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


def checkpoint_tokenizer_dir(init_from):
    """Where the tokenizer files of checkpoint ``init_from`` are (a converted directory keeps them in
    ``hf_files/``), or None when it has no ``tokenizer.json``."""
    if init_from is None:
        return None
    for d in (init_from, os.path.join(init_from, "hf_files")):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    return None


def data_tokenizer(data, tokenizer_file):
    """The ``tokenizers.Tokenizer`` that text data is encoded with (``tokenizer_file``, else the DeepSeek
    tokenizer), or None for the built-in data and for sources that are all pre-tokenized ``.npy`` (unless a
    tokenizer is given: its EOS then splits 1-D files)."""
    if data in (None, "arithmetic"):
        return None
    from deepseek_jax.data.readers import expand_source
    from deepseek_jax.data.stream import parse_mixture

    sources = [path for path, _ in parse_mixture(data) or [(data, 1.0)]]
    if tokenizer_file is None and all(p.endswith(".npy") for s in sources for p in expand_source(s)):
        return None
    from tokenizers import Tokenizer

    from deepseek_jax.data.tokenizer import default_tokenizer_path

    path = tokenizer_file if tokenizer_file else str(default_tokenizer_path())
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers error does not name the file
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


def report_arithmetic(workdir: str) -> dict:
    """What the model learned: exact greedy answers on held-out sums, and a few of them. The figures are also
    written to ``workdir/heldout.json`` (whole or not at all)."""
    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.training.evaluate import evaluate_arithmetic
    from deepseek_jax.training.metrics import write_json

    config, params = load_pretrained(workdir)  # a LoRA run's: its base with the adapters folded in
    report = evaluate_arithmetic(config, params)
    write_json(os.path.join(workdir, "heldout.json"), {"exact": report["exact"], "answers": report["answers"],
                                                       "samples": [list(s) for s in report["samples"]]})
    print(f"held-out arithmetic: {report['exact']:.1%} of {report['answers']} answers exactly right "
          f"(greedy decoding)")
    for question, answer, truth in report["samples"]:
        mark = "ok" if answer == truth else f"wrong, {truth}"
        print(f"  {question}{answer}   ({mark})")
    return report


def add_run_arguments(p, *, workdir: str, steps: int, lr: float) -> None:
    """The flags every training-like command (train, distill) shares: where, how long, batch and optimizer."""
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32")


def checkpoint_config(init_from: str, overrides: dict, who: str):
    """The ``ModelConfig`` of checkpoint ``init_from`` (``--init-from``): its architecture is kept, so a ``--set``
    in ``overrides`` may only repeat the checkpoint's own value (``who`` keeps it, in the message)."""
    from deepseek_jax.checkpoint.load import pretrained_config

    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"--init-from {init_from}: no such directory")
    config = pretrained_config(init_from)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"--set {key}: not a config field")
        if getattr(config, key) != value:
            raise ValueError(f"--set {key}={value!r} conflicts with --init-from {init_from} ({key} = "
                             f"{getattr(config, key)!r}): {who} keeps the checkpoint's architecture")
    return config


def add_lora_args(p, default_help: str = "full fine-tuning", extras: bool = False) -> None:
    """``--lora-rank``, ``--lora-alpha``, ``--lora-targets``: LoRA adapters on a checkpoint (``--init-from``), the
    flags of every command that trains one (train, distill, grpo); ``lora_config`` reads them back.
    ``default_help``: what the command does without ``--lora-rank``; ``extras``: also ``--lora-dropout`` and
    ``--fp8-weights`` (QLoRA), which only ``train`` takes so far."""
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="LoRA: train rank-R adapters on the targeted linear layers (and routed experts) only; the "
                        f"base (--init-from) stays as it is (default 0: {default_help})")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="A",
                   help="LoRA's alpha: the adapters' output is scaled by A / R (default 16)")
    p.add_argument("--lora-targets", action="append", default=[], metavar="GLOB",
                   help="LoRA: the linear layers that get adapters, globs over their paths, e.g. "
                        "'*self_attn/q_b_proj' (repeatable; default: the attention projections and the routed "
                        "experts, '*self_attn/*proj*' and '*mlp/experts/*_proj')")
    if extras:
        p.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                       help="LoRA: dropout at rate P on the adapters' input, as PEFT's lora_dropout (default 0)")
        p.add_argument("--fp8-weights", action="store_true",
                       help="QLoRA: keep the FP8 kernels of --init-from (an FP8 release, or `convert --keep-fp8`) "
                            "as stored, e4m3 + 128x128 block scales (V4's experts FP4), dequantized where each "
                            "matmul reads them; needs --lora-rank")


def lora_config(args) -> dict:
    """``add_lora_args``' flags as ``TrainConfig`` fields."""
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_targets": tuple(args.lora_targets),
            "lora_dropout": getattr(args, "lora_dropout", 0.0), "fp8_base": getattr(args, "fp8_weights", False)}


def add_slice_args(p) -> None:
    """``--num-slices`` and ``--dcn-mesh``: a mesh over several slices (pods joined over DCN)."""
    p.add_argument("--num-slices", type=int, default=1,
                   help="the devices form N slices joined over DCN; the mesh's leading axis (or --dcn-mesh's "
                        "axes) spans them, e.g. --num-slices 2 --mesh data=2,fsdp=32,expert=8")
    p.add_argument("--dcn-mesh", default=None, metavar="AXIS=SLICES",
                   help="which mesh axes span the slices, e.g. data=2 or fsdp=2 (default: the first axis the slice "
                        "count divides); only these axes' collectives cross DCN")
