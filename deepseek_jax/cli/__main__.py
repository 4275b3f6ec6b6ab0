"""``python -m deepseek_jax.cli``: the ``deepseek-jax`` console script."""

import sys

from deepseek_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
