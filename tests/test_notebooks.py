"""examples/*.ipynb: every notebook is committed without outputs and runs top to bottom, showing its figures.

Each notebook runs in a fresh IPython kernel on this interpreter (with this checkout first on the path), in a
temporary working directory that is also its TMPDIR, so nothing lands in the repository. A cell that raises
(the notebooks assert their key numbers) or runs past ``CELL_TIMEOUT_S`` fails the test, naming the notebook
and the cell.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra (nbformat, nbclient)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "examples", "*.ipynb")))
CELL_TIMEOUT_S = 300  # the ceiling is 3 minutes per notebook; one cell on a loaded 2-core machine
KERNEL_NAME = "deepseek-jax-test-python"


def _ids(paths):
    return [os.path.basename(p) for p in paths]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the example notebooks in {REPO}/examples, found {_ids(NOTEBOOKS)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path):
    """Outputs and execution counts stay out of git (strip them with `python examples/strip_outputs.py`)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{os.path.basename(path)}: cells {dirty} have outputs or execution counts; run "
                       f"`python examples/strip_outputs.py {os.path.relpath(path, REPO)}` before committing")


def _kernel_spec_dir(tmp_path) -> str:
    """A kernelspec that starts ipykernel on this very interpreter (a `python3` spec installed elsewhere on the
    machine could point at another environment)."""
    root = tmp_path / "jupyter"
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "deepseek-jax tests", "language": "python"}))
    return str(root)


def _cell_head(cell, lines: int = 3) -> str:
    return "\n".join(cell.source.splitlines()[:lines])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    pytest.importorskip("ipykernel", reason="the notebook tests need the test extra (ipykernel)")
    name = os.path.basename(path)
    work = tmp_path / "cwd"
    work.mkdir()
    # The kernel inherits this environment: this checkout's package first, temp files in the test's directory.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("TMPDIR", str(work))
    monkeypatch.setenv("JUPYTER_PATH", _kernel_spec_dir(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    before = sorted(os.listdir(REPO)), sorted(os.listdir(os.path.join(REPO, "examples")))

    nb = nbformat.read(path, as_version=4)
    current = {}
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(work)}},
        on_cell_start=lambda cell, cell_index: current.update(index=cell_index, cell=cell))
    t0 = time.perf_counter()
    try:
        client.execute()
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError) as e:
        where = f"{name}, cell {current.get('index')}"
        head = _cell_head(current["cell"]) if "cell" in current else ""
        pytest.fail(f"{where} failed:\n{head}\n...\n{str(e)[-4000:]}", pytrace=False)
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.0f} s")

    images = sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
                 if "image/png" in out.get("data", {}))
    assert images >= 1, f"{name}: ran, but no cell showed a figure"
    errors = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{name}: cells {errors} show errors"
    after = sorted(os.listdir(REPO)), sorted(os.listdir(os.path.join(REPO, "examples")))
    assert after == before, f"{name} wrote into the repository: {set(after[0] + after[1]) ^ set(before[0] + before[1])}"


def test_strip_outputs_cleans_an_executed_notebook(tmp_path):
    """examples/strip_outputs.py removes what execution adds, and the check above would have caught it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_outputs", os.path.join(REPO, "examples", "strip_outputs.py"))
    strip_outputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(strip_outputs)
    v4 = nbformat.v4
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# title"), v4.new_code_cell("print(1)"),
                                v4.new_code_cell("x = 2")])
    nb.cells[1].outputs = [v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[1].execution_count = 1
    nb.cells[2].execution_count = 2
    path = str(tmp_path / "run.ipynb")
    nbformat.write(nb, path)
    with pytest.raises(AssertionError, match=r"cells \[1, 2\] have outputs"):
        test_notebook_is_committed_without_outputs(path)
    assert strip_outputs.strip(path) is True
    test_notebook_is_committed_without_outputs(path)
    clean = nbformat.read(path, as_version=4)
    assert [c.source for c in clean.cells] == ["# title", "print(1)", "x = 2"]
    assert strip_outputs.strip(path) is False  # already clean: not rewritten
