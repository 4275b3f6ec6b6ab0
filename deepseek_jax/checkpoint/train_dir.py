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
        shardings = _adapters_on(meta, jax.tree.map(lambda _: one, meta) if shardings is None else shardings, one)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), meta, shardings)
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)}))
    params = restored[STATE_ITEM]["params"]
    scale = lora_scale(workdir)
    if scale is None:
        return config, params
    from deepseek_jax.layers.lora import is_adapter_path, merge

    params = _map_adapters(params, jax.device_get, is_adapter_path)
    if all(is_adapter_path(k) for k in _leaf_names(params)):  # the checkpoint holds the adapters only
        params = _with_base(workdir, params, given, load_base)
    # a LoRA run: its adapters folded into their kernels (layers/lora.py's merge)
    return config, merge(params, scale) if merge_lora else params


def _leaf_names(tree):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_names(v)
        else:
            yield k


def _with_base(workdir, adapters: dict, shardings, load_base) -> dict:
    """A LoRA checkpoint's ``adapters`` with the base its ``train_config.json`` names (``lora_base``) around them,
    the base read into ``shardings`` (without the adapter entries)."""
    from deepseek_jax.layers.lora import combine, without_adapters

    with open(os.path.join(os.fspath(workdir), "train_config.json")) as f:
        base = json.load(f).get("lora_base")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"{workdir}: a LoRA run's checkpoints hold only the adapters, and its base "
                                f"(train_config.json's lora_base: {base!r}) is not a directory here")
    if load_base is None:
        raise ValueError(f"{workdir}: a LoRA run's checkpoint; its base is read by load_pretrained(workdir)")
    _, params = load_base(base, shardings=None if shardings is None else without_adapters(shardings))
    return combine(adapters, params)


def _adapters_on(meta, shardings, sharding):
    """``shardings`` (a params tree, possibly without the adapters) with every adapter leaf of ``meta`` on
    ``sharding``."""
    if not isinstance(meta, dict):
        return shardings
    return {k: sharding if k.endswith(("lora_a", "lora_b")) else _adapters_on(v, shardings[k], sharding)
            for k, v in meta.items()}


def _map_adapters(tree, fn, is_adapter):
    if not isinstance(tree, dict):
        return tree
    return {k: fn(v) if is_adapter(k) else _map_adapters(v, fn, is_adapter) for k, v in tree.items()}


def lora_scale(workdir) -> Optional[float]:
    """``alpha / rank`` of a LoRA run's work directory (its ``train_config.json``); None for other runs."""
    with open(os.path.join(os.fspath(workdir), "train_config.json")) as f:
        tc = json.load(f)
    return tc["lora_alpha"] / tc["lora_rank"] if tc.get("lora_rank") else None
