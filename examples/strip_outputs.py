"""Strip outputs and execution counts from notebooks before committing them (tests/test_notebooks.py checks).

    python examples/strip_outputs.py                  # every examples/*.ipynb
    python examples/strip_outputs.py examples/03_training.ipynb

Needs nbformat (in the `test` and `notebooks` extras). Cell sources and notebook metadata are kept; a notebook
that is already clean is not rewritten.
"""

from __future__ import annotations

import glob
import os
import sys

import nbformat


def strip(path: str) -> bool:
    """Clear the outputs and execution counts of ``path``'s code cells; True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):  # run timings and view state that editors add
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    if changed:
        nbformat.validate(nb)
        nbformat.write(nb, path)
    return changed


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.ipynb")))
    for path in paths:
        print(f"{path}: {'stripped' if strip(path) else 'clean'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
