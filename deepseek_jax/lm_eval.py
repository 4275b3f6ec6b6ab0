"""lm-evaluation-harness's model ``deepseek-jax`` (``pip install -e ".[eval]"``).

    lm_eval.simple_evaluate(model="deepseek-jax", model_args="pretrained=DIR,batch_size=8", tasks=[...])
    python -m deepseek_jax.lm_eval --model deepseek-jax --model_args pretrained=DIR --tasks ...

Importing ``deepseek_jax`` registers the name, lazily: the model (``inference/harness.py``) is imported when
lm-eval first builds it. lm-eval's own ``lm_eval`` console script imports no plugins, so from a shell run it through
``python -m deepseek_jax.lm_eval`` (the same arguments), which registers the name first.

- ``loglikelihood``: log p(continuation | BOS + context), summed over the continuation's tokens, and whether each
  of them is the argmax. Requests are packed into rows of ``max_length`` with a segment per request (the training
  forward's segment mask, ``inference/scoring.py``).
- ``loglikelihood_rolling``: a document's log-likelihood after BOS, every token predicted once, in lm-eval's own
  windows of ``max_length`` (``lm_eval.utils.get_rolling_token_windows``: each window keeps as much context as fits).
- ``generate_until``: ``deepseek_jax.generate`` over ``batch_size`` prompts at a time (greedy unless the task
  asks for a temperature), cut at the first of the task's ``until`` strings.

Model arguments: ``pretrained`` (a directory ``load_pretrained`` reads), ``tokenizer`` (a ``tokenizer.json``;
default the checkpoint's), ``batch_size``, ``max_length`` (default the model's context, at most 4096),
``max_gen_toks`` (256), ``dtype`` and ``mesh`` (e.g. ``fsdp=4,expert=2``).
"""

from __future__ import annotations

import sys
from typing import Optional

NAME = "deepseek-jax"


def register() -> bool:
    """Register ``deepseek-jax`` with lm-eval's model registry, if lm-eval is installed; whether it is."""
    try:
        import lm_eval.models  # noqa: F401  lm-eval loads its built-in models only into an empty registry
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if NAME not in model_registry:
        model_registry.register(NAME, target="deepseek_jax.inference.harness:DeepSeekLM")
    return True


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's command line with ``deepseek-jax`` registered."""
    if not register():
        raise SystemExit("error: lm-eval is not installed; pip install -e \".[eval]\"")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
