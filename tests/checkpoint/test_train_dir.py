"""checkpoint.train_dir: the params of a train work directory, read without the optimizer state."""

import jax
import numpy as np
from orbax.checkpoint import type_handlers

from deepseek_jax.checkpoint.load import load_pretrained
from deepseek_jax.cli import main


def test_loading_a_workdir_reads_only_the_params(tmp_path, monkeypatch):
    """``load_pretrained(workdir)`` (as ``generate``, ``--init-from`` and the distill teacher use it) deserializes
    exactly the params' arrays: Adam's two moments (twice the params) stay on disk (they were restored whole onto
    one device before)."""
    work = str(tmp_path / "run")
    assert main(["train", "--workdir", work, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--set", "num_hidden_layers=2", "--no-resume"]) == 0
    read = []
    real = type_handlers.ArrayHandler.deserialize

    async def spy(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await real(self, infos, args)

    monkeypatch.setattr(type_handlers.ArrayHandler, "deserialize", spy)
    config, params = load_pretrained(work)
    leaves = jax.tree.leaves(params)
    assert len(read) == len(leaves) > 10
    assert all(name.startswith("params.") for name in read), read[:5]
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
