"""The ``deepseek-jax`` console script. Each subcommand lives in its own module, which provides
``register(subparsers)``: it adds its parser(s) and sets ``func`` on them (``func(args) -> exit code``)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register subcommands; each adds itself here.
COMMAND_MODULES: tuple[str, ...] = (
    "deepseek_jax.cli.info",
    "deepseek_jax.cli.convert",
    "deepseek_jax.cli.generate",
    "deepseek_jax.cli.evaluate",
    "deepseek_jax.cli.train",
    "deepseek_jax.cli.distill",
    "deepseek_jax.cli.grpo",
    "deepseek_jax.cli.plan",
    "deepseek_jax.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description="DeepSeek models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
