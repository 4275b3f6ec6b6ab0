"""``deepseek-jax grpo``: GRPO with rule-checked rewards on a checkpoint (the built-in arithmetic task by default,
or ``{"prompt", "answer"}`` lines of a ``.jsonl``), of the whole policy or of LoRA adapters (``--lora-rank``), with
checkpoints, resume and metrics as in ``train``."""

from __future__ import annotations

import importlib
import os
import sys


def _reward(spec: str):
    """A name from ``rewards.REWARDS``, or ``module:function`` (a plain Python callable)."""
    from deepseek_jax.posttrain.rewards import REWARDS

    if spec in REWARDS:
        return REWARDS[spec]
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"--reward {spec!r}: expected one of {sorted(REWARDS)} or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: not callable")
    return fn


def _run(args) -> int:
    from deepseek_jax.checkpoint.load import load_pretrained, pretrained_config
    from deepseek_jax.checkpoint.safetensors_io import CheckpointError
    from deepseek_jax.cli.common import lora_config
    from deepseek_jax.config.model import ConfigError
    from deepseek_jax.config.presets import presets
    from deepseek_jax.posttrain.grpo import GRPOConfig, grpo
    from deepseek_jax.posttrain.rollouts import (
        JsonlPrompts,
        evaluate_accuracy,
        heldout_arithmetic,
    )
    from deepseek_jax.training.config import TrainConfig

    try:
        reward_fn = _reward(args.reward)
        gc = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, clip_eps=args.clip_eps,
                        beta=args.beta, iterations=args.iterations, token_level=args.token_level,
                        speculative=False if args.no_speculative else None, eval_every=args.eval_every,
                        eval_prompts=args.eval_prompts, filter_groups=args.filter_groups,
                        max_sample_rounds=args.max_sample_rounds,
                        tis_cap=None if args.tis_cap == 0 else args.tis_cap, rollout_dtype=args.rollout_dtype)
        tc = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                         min_lr_ratio=args.min_lr_ratio,
                         weight_decay=args.weight_decay, grad_accum=args.grad_accum, seed=args.seed,
                         batch_size=gc.batch_size, bias_update_rate=args.bias_update_rate, **lora_config(args))
        if args.init_from is None and args.preset is None:
            raise ValueError("give --init-from DIR (the policy to improve) or --preset NAME (random weights)")
        if args.init_from is not None and not os.path.isdir(args.init_from):
            raise FileNotFoundError(f"--init-from {args.init_from}: no such directory")
        config = pretrained_config(args.init_from) if args.init_from else presets[args.preset]
        if args.preset and args.prompts is None:
            from deepseek_jax.data.tasks.arithmetic import BOS_ID, EOS_ID

            config = config.replace(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        prompts, tokenizer = None, None
        if args.prompts is not None:
            from deepseek_jax.cli.common import checkpoint_tokenizer_dir, data_tokenizer

            tok = args.tokenizer or checkpoint_tokenizer_dir(args.init_from)
            if tok is None:
                raise ValueError("--prompts needs a tokenizer: --tokenizer, or a checkpoint with tokenizer.json")
            tokenizer = data_tokenizer(args.prompts, tok)
            eos = config.eos_token_id
            prompts = JsonlPrompts(args.prompts, tokenizer, gc.prompts_per_step, args.seed,
                                   stop_ids=[eos] if isinstance(eos, int) else list(eos or []))
        arithmetic = prompts is None
        before = None
        if arithmetic and args.init_from and not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
            _, params = load_pretrained(args.init_from)
            before = evaluate_accuracy(config, params, *heldout_arithmetic(args.eval_prompts))
        records = grpo(gc, tc, args.workdir, init_from=args.init_from, config=config, reward_fn=reward_fn,
                       prompts=prompts, tokenizer=tokenizer, seq_len=args.seq_len, mesh_spec=args.mesh,
                       save_every=args.save_every, keep=args.keep, resume=not args.no_resume)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if records:
        last = records[-1]
        print(f"step {last['step']}: reward {last['reward']:.3f}, sampled accuracy {last['accuracy']:.3f}, "
              f"KL {last['kl']:.4f}; metrics in {os.path.join(args.workdir, 'metrics.jsonl')}, curves in "
              f"{os.path.join(args.workdir, 'loss.png')}", file=sys.stderr)
    if arithmetic:
        config, params = load_pretrained(args.workdir)  # a LoRA run's: its base with the adapters folded in
        after = evaluate_accuracy(config, params, *heldout_arithmetic(args.eval_prompts))
        was = f"{before:.1%} -> " if before is not None else ""
        print(f"held-out arithmetic (greedy, {args.eval_prompts} questions): {was}{after:.1%} exactly right")
    return 0


def register(sub) -> None:
    from deepseek_jax.cli.common import add_lora_args

    p = sub.add_parser("grpo", help="GRPO (R1's RL) with rule-checked rewards, on the arithmetic task by default")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--init-from", default=None, metavar="DIR",
                     help="the policy: a train work directory, an HF or a converted checkpoint (also the reference)")
    src.add_argument("--preset", default=None, help="a preset with random weights (for a quick try)")
    add_lora_args(p, default_help="the whole policy trains; with R, the rollouts sample the adapted policy and the "
                                  "KL's reference is the base itself")
    p.add_argument("--workdir", default="runs/grpo")
    p.add_argument("--reward", default="exact",
                   help="exact (default), think-format, think-exact, or module:function (reward(prompt, "
                        "completion, answer) -> float)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="{\"prompt\": ..., \"answer\": ...} per line (default: the built-in arithmetic questions)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for --prompts (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=None, help="training row length (default: fits arithmetic)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the reference")
    p.add_argument("--iterations", type=int, default=2, help="optimizer steps per batch of samples")
    p.add_argument("--token-level", action="store_true",
                   help="normalize over all completion tokens (default: per sample, then the group mean)")
    p.add_argument("--no-speculative", action="store_true", help="no MTP speculation in the rollouts")
    p.add_argument("--rollout-dtype", choices=("float32", "bfloat16"), default=None,
                   help="the rollouts' compute and cache dtype (default: bfloat16 on GPU / TPU, float32 on CPU)")
    p.add_argument("--tis-cap", type=float, default=2.0,
                   help="truncated importance weight min(pi_old / sampler, CAP) on each token's surrogate, "
                        "correcting for the sampler's differences from the training forward (0: off)")
    p.add_argument("--filter-groups", action="store_true",
                   help="DAPO's dynamic sampling: train only on groups whose rewards differ, drawing more prompts "
                        "(up to --max-sample-rounds rounds of --prompts-per-step) to fill the batch")
    p.add_argument("--max-sample-rounds", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=5, help="warmup, in GRPO steps")
    p.add_argument("--min-lr-ratio", type=float, default=1.0,
                   help="cosine decay over the run's steps x --iterations updates down to lr x this (default 1.0: a "
                        "constant lr after warmup, as DeepSeekMath's GRPO)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--bias-update-rate", type=float, default=0.0,
                   help="the MoE balancing bias update per optimizer step (default 0: during GRPO the router moves "
                        "only by the policy gradient; train's default is 0.001)")
    p.add_argument("--eval-every", type=int, default=10, help="held-out greedy accuracy every N steps (arithmetic)")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,expert=2 (default: all devices on data)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
