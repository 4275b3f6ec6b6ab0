"""The converter as a folder you can run: ``python convert SRC DST [--keep-fp8] ...`` is ``deepseek-jax convert``.

The converter itself lives in the package (``deepseek_jax/checkpoint/convert/``); this folder is only an entry
point, and is not installed.
"""

import sys

from deepseek_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
