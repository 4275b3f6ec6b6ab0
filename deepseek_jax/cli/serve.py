"""``deepseek-jax serve``: an OpenAI-compatible server (``inference/server.py``) over the continuous-batching
engine (``inference/engine.py``), on one device or a mesh (``--mesh``); needs the ``serve`` extra
(``pip install -e ".[serve]"``)."""

from __future__ import annotations

import os
import sys


def _run(args) -> int:
    try:
        import uvicorn

        from deepseek_jax.inference.server import make_app
    except ImportError as e:
        print(f"error: {e.name} is missing: `deepseek-jax serve` needs the serve extra "
              f"(pip install -e \".[serve]\")", file=sys.stderr)
        return 2
    from deepseek_jax.cli.generate import _check, _load, _mesh, _options, eos_id
    from deepseek_jax.data.chat_template import STYLES, default_style
    from deepseek_jax.inference.engine import Engine
    from deepseek_jax.layers import kv_cache

    if args.slots < 1 or args.max_queue < 0:
        print(f"error: --slots {args.slots} / --max-queue {args.max_queue}: expected >= 1 / >= 0", file=sys.stderr)
        return 2
    args.preset, args.seed = None, 0  # what generate's loader reads: a checkpoint (placed on --mesh's devices)
    config, params, tokenizer = _load(args)
    if not _check(args, config):
        return 2
    style = args.style or default_style(config)
    if style not in STYLES:
        print(f"error: --style {style}: expected one of {STYLES}", file=sys.stderr)
        return 2
    eos = eos_id(tokenizer, config)
    try:
        engine = Engine(config, params, tokenizer=tokenizer, eos=() if eos is None else
                        (eos,) if isinstance(eos, int) else tuple(eos), slots=args.slots, max_len=args.max_len,
                        max_queue=args.max_queue, options=_options(args), cache_dtype=args.cache_dtype,
                        steps_per_call=args.steps_per_call, prefill_chunk=args.prefill_chunk,
                        prefix_cache=args.prefix_cache, speculative=args.speculative, mesh=_mesh(args),
                        page=args.page or None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    app = make_app(engine, name, tokenizer, chat_style=style)
    engine.start()
    pool = kv_cache.cache_nbytes(engine.cache)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots of {engine.max_len} tokens: "
          f"a cache pool of {pool / 2**20:,.1f} MiB, plus up to {args.prefix_cache} kept prefix rows of "
          f"{pool / args.slots / 2**20:,.1f} MiB; chat style {style}); Ctrl-C stops", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument("--checkpoint", required=True, help="a directory load_pretrained reads (HF, converted, a work dir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the directory's name)")
    p.add_argument("--mesh", default=None,
                   help="serve over a device mesh, e.g. expert=4,data=2: the params by the training rules, the cache "
                        "pool's slots over the batch axes (default: one device)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (the cache pool's rows)")
    p.add_argument("--max-len", type=int, default=4096,
                   help="context per slot, prompt + completion (default 4096, at most the model's "
                        "max_position_embeddings); the cache pool holds slots x max-len tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per host round trip while no request waits for a slot (default 4)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="longer prompts are prefilled this many tokens (a power of two) per turn, between the "
                        "running requests' decode steps (default 512)")
    p.add_argument("--prefix-cache", type=int, default=4,
                   help="keep the prefilled rows of this many recent prompts longer than --prefill-chunk (one "
                        "slot's cache each); a prompt that starts with whole chunks of one reuses them (default 4)")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding in the batch: each step drafts a token per request with the MTP "
                        "module and verifies it (V3/R1 with MTP weights)")
    p.add_argument("--page", type=int, default=64,
                   help="decode reads each request's own pages of this many cache slots (default 64; 0: a window "
                        "past the longest running request, as on a mesh and for V3.2)")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute and params dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "fp8"))
    p.add_argument("--fp8-weights", action="store_true", help="keep an FP8 checkpoint's weights as stored")
    p.add_argument("--style", default=None, help="chat template: v3, r1 or v2 (default: from the model type)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=_run)
