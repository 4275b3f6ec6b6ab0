"""``deepseek-jax info``: a preset's or checkpoint's architecture, parameter counts and MLA cache size."""

from __future__ import annotations

import os


def _run(args) -> int:
    from deepseek_jax.config import ModelConfig, presets
    from deepseek_jax.tools.info import describe

    if os.path.exists(args.model):
        config = ModelConfig.from_pretrained(args.model)
    else:
        config = presets[args.model]
    print(describe(config))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter counts and cache size of a preset or checkpoint")
    p.add_argument("model", help="a preset name (e.g. deepseek-v3) or a directory with config.json")
    p.set_defaults(func=_run)
