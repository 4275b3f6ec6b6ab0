"""Saving and resuming training runs: Orbax ``CheckpointManager`` steps of the whole train state plus a JSON
record, in the layout ``checkpoint/train_dir.py`` reads back."""

from __future__ import annotations

import os
from typing import Optional

from deepseek_jax.checkpoint.train_dir import META_ITEM, STATE_ITEM


class Checkpointer:
    """Orbax ``CheckpointManager``: async saves every ``every`` steps, keeps ``keep``; the train state plus a
    JSON record (data position, RNG seed, step). Orbax writes each step into a temporary directory and
    renames it when complete, so a save interrupted by a crash is never listed as the latest step."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True, to_saved=None):
        """``to_saved``: ``state -> what is written`` (a LoRA run's trainer drops the frozen base)."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._to_saved = to_saved or (lambda state: state)
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def delete_all(self) -> list[int]:
        """Delete every saved step (a run started afresh in this directory); returns them."""
        steps = sorted(self.manager.all_steps())
        for step in steps:
            self.manager.delete(step)
        return steps

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        ocp = self._ocp
        items = {STATE_ITEM: ocp.args.StandardSave(self._to_saved(state)), META_ITEM: ocp.args.JsonSave(meta)}
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state):
        ocp = self._ocp
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out[STATE_ITEM], out[META_ITEM]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
