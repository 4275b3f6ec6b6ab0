"""A ``deepseek-jax train`` work directory as a checkpoint: its config and the params of a saved step.

A work directory holds ``config.json``, ``train_config.json`` and ``checkpoints/`` (an Orbax
``CheckpointManager``: per step a ``state`` item, the whole train state, and a ``meta`` JSON item; see
``training/checkpoints.py``). Reading the params needs neither the trainer nor the optimizer: only the ``params``
subtree of the state is restored (an Orbax partial restore), straight into the shardings asked for; the
optimizer's moments stay on disk.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.layers.lora import combine, merge, without_adapters

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, META_ITEM = "state", "meta"


def is_train_workdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return all(os.path.exists(os.path.join(path, f)) for f in ("config.json", "train_config.json", CHECKPOINTS_DIR))


def load_train_checkpoint(workdir: str | os.PathLike, step: Optional[int] = None, shardings=None,
                          merge_lora: bool = True, load_base=None):
    """``(config, params)`` from a train work directory: step ``step`` (default the latest finished one).

    ``shardings``: a params-shaped tree of ``Sharding`` to restore each leaf into (each process reads only its
    shards' chunks); default the first device. The params come back in the dtype they were saved in (the
    run's master weights). A LoRA run's adapters are folded into their kernels unless ``merge_lora`` is False
    (then they come back as they are, next to the base); its checkpoints hold only the adapters, and the base is
    read from where ``train_config.json``'s ``lora_base`` points, by ``load_base`` (``checkpoint/load.py``'s
    ``load_pretrained``)."""
    import jax
    import orbax.checkpoint as ocp

    workdir = os.fspath(workdir)
    config = ModelConfig.from_pretrained(workdir)
    scale = lora_scale(workdir)
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))
    handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no finished checkpoint to load")
        meta = manager.item_metadata(step)[STATE_ITEM]
        meta = getattr(meta, "tree", meta)["params"]
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        given = shardings
        if shardings is None or scale is not None:  # a LoRA checkpoint's adapters: small, on one device
            shardings = jax.tree.map(lambda _: one, meta)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), meta, shardings)
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)}))
    params = restored[STATE_ITEM]["params"]
    if scale is None:
        return config, params
    # A LoRA run: its checkpoint holds the adapters only; the base around them, the adapters folded in.
    params = _with_base(workdir, jax.device_get(params), given, load_base)
    return config, merge(params, scale) if merge_lora else params


def _with_base(workdir, adapters: dict, shardings, load_base) -> dict:
    """A LoRA checkpoint's ``adapters`` with the base its ``train_config.json`` names (``lora_base``) around them,
    the base read into ``shardings`` (without the adapter entries)."""
    with open(os.path.join(os.fspath(workdir), "train_config.json")) as f:
        base = json.load(f).get("lora_base")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"{workdir}: a LoRA run's checkpoints hold only the adapters, and its base "
                                f"(train_config.json's lora_base: {base!r}) is not a directory here")
    if load_base is None:
        raise ValueError(f"{workdir}: a LoRA run's checkpoint; its base is read by load_pretrained(workdir)")
    _, params = load_base(base, shardings=None if shardings is None else without_adapters(shardings))
    return combine(adapters, params)


def lora_scale(workdir) -> Optional[float]:
    """``alpha / rank`` of a LoRA run's work directory (its ``train_config.json``); None for other runs."""
    with open(os.path.join(os.fspath(workdir), "train_config.json")) as f:
        tc = json.load(f)
    return tc["lora_alpha"] / tc["lora_rank"] if tc.get("lora_rank") else None
