"""Orbax side of the converter: write a params tree one source slot at a time, read it back lazily or sharded.

A converted checkpoint is a directory::

    DST/config.json          HF field names (what ``ModelConfig.from_pretrained`` reads)
    DST/deepseek_jax.json    {"format": "deepseek-jax-orbax", "dtype": ..., "fp8": ...}
    DST/params/              an Orbax PyTree checkpoint of the params tree (scanned layout)

Orbax saves a pytree from arrays that are all in memory at once; a V3 leaf such as
``moe_layers/mlp/experts/gate_proj`` is 58 x 256 experts (436 GB in bf16). So each leaf is handed to Orbax as
a ``StreamedLeaf`` (shape, dtype and a generator of ``(index, slot)`` pairs) and our type handler writes the
slots one after the other into the leaf's tensorstore array, chunked so that one slot is one chunk. The files
are ordinary Orbax arrays: ``StandardCheckpointer.restore`` with ``jax.ShapeDtypeStruct(..., sharding=...)``
targets reads them back, each host reading only the chunks of its own shards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import threading
from typing import Callable, Iterator, Optional

import numpy as np

FORMAT = "deepseek-jax-orbax"
MARKER_FILE = "deepseek_jax.json"
PARAMS_DIR = "params"
SCALE_SUFFIX = "_scale_inv"
MAX_WRITES_IN_FLIGHT = 2  # slots handed to tensorstore and not yet written
CHUNK_BYTES = 32 * 1024 * 1024  # storage chunk cap: finer reads for hosts restoring one shard of a big slot


def is_converted_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER_FILE))


def read_marker(path: str | os.PathLike) -> dict:
    with open(os.path.join(os.fspath(path), MARKER_FILE)) as f:
        return json.load(f)


class StreamedLeaf:
    """A leaf Orbax saves without holding it: ``slots()`` yields ``(index, array)`` for the leading ``lead`` dims.

    ``index`` addresses the leading dims (``()`` when ``lead == 0``: the array is the whole leaf).
    """

    def __init__(self, shape: tuple[int, ...], dtype, lead: int,
                 slots: Callable[[], Iterator[tuple[tuple, np.ndarray]]]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.lead = lead
        self.slots = slots
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim = len(self.shape)


class _WriterStopped(Exception):
    """Stands in, inside Orbax, for the error or Ctrl-C that stopped our writer (kept in ``WriteState``)."""


class WriteState:
    """Shared between the caller and Orbax's background writer: the first error and a cancel flag."""

    def __init__(self):
        self.error: Optional[BaseException] = None
        self.cancelled = threading.Event()


def _streaming_handler(state: WriteState):
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import ocdbt_utils, type_handlers, types
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    class StreamingHandler(type_handlers.NumpyHandler):
        """Writes ``StreamedLeaf`` values slot by slot, leaf after leaf, ``MAX_WRITES_IN_FLIGHT`` slots at most
        waiting on tensorstore. Chunks are at most ``CHUNK_BYTES`` and never straddle two slots, so a host
        restoring its shard of a stacked leaf reads only its layers' / experts' chunks."""

        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def _background_serialize(self, values, infos, args=None):
            args = args or [None] * len(values)
            pending: collections.deque = collections.deque()
            try:
                for value, info, arg in zip(values, infos, args):
                    await info.await_path_creation()
                    arg = dataclasses.replace(arg or types.SaveArgs(), chunk_byte_size=CHUNK_BYTES)
                    spec = ts_utils.build_array_write_spec(
                        info=info, arg=arg, global_shape=value.shape,
                        local_shape=(1,) * value.lead + value.shape[value.lead:], dtype=value.dtype,
                        use_ocdbt=info.is_ocdbt_checkpoint,
                        process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                    )
                    t = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
                    # A few writes in flight, so tensorstore encodes and writes while the next slot is read.
                    for index, slot in value.slots():
                        if state.cancelled.is_set():
                            raise KeyboardInterrupt
                        pending.append(t[index].write(np.ascontiguousarray(slot, dtype=value.dtype)))
                        del slot
                        while len(pending) > MAX_WRITES_IN_FLIGHT:
                            await pending.popleft()
                while pending:
                    await pending.popleft()
            except BaseException as e:  # noqa: BLE001 -- handed back to the caller's thread
                if state.error is None:
                    state.error = e
                while pending:  # let in-flight writes settle, so nothing writes after the caller cleans up
                    try:
                        await pending.popleft()
                    except BaseException:  # noqa: BLE001
                        pass
                # Orbax sees an ordinary exception (no thread traceback on stderr); the caller re-raises ours.
                raise _WriterStopped() from None

    return StreamingHandler()


@contextlib.contextmanager
def _no_per_file_fsync():
    """tensorstore fsyncs every chunk file it writes, which caps a conversion at the disk's synchronous write
    speed (0.2 GB/s here, against 1+ GB/s buffered). We write without it and fsync the finished directory
    once before renaming it into place (``fsync_tree``). Orbax builds its tensorstore context from these
    module-level defaults, so they are switched for the duration of the save."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    saved = ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT
    ts_utils._BASE_TS_CONTEXT = {**saved[0], "file_io_sync": False}
    ts_utils._DEFAULT_OCDBT_TS_CONTEXT = {**saved[1], "file_io_sync": False}
    try:
        yield
    finally:
        ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT = saved


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (before the atomic rename makes it visible)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_streamed(path: str, tree: dict, state: Optional[WriteState] = None) -> None:
    """Write ``tree`` (leaves: ``StreamedLeaf`` or numpy arrays) as an Orbax PyTree checkpoint at ``path``.

    Errors raised while producing slots (bad input) come back unchanged; ``KeyboardInterrupt`` stops the
    background writer before returning.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as registry

    state = state or WriteState()
    handlers = registry.create_type_handler_registry(
        (StreamedLeaf, _streaming_handler(state)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; its presence keeps array metadata on
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=handlers, use_compression=False)
    failure: list[BaseException] = []

    def run():
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.CRITICAL)  # Orbax logs our writer's error with a traceback; we report it ourselves
        try:
            with _no_per_file_fsync(), ocp.Checkpointer(handler) as ckptr:
                ckptr.save(path, args=ocp.args.PyTreeSave(tree))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            failure.append(e)
        finally:
            absl.setLevel(level)

    # The save runs on its own thread so that Ctrl-C reaches us here, between joins: we then stop the writer
    # and wait until nothing writes any more, so the caller can remove the output without a race.
    thread = threading.Thread(target=run, name="deepseek-jax-orbax-save", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        state.cancelled.set()
        while thread.is_alive():
            try:
                thread.join(0.1)
            except KeyboardInterrupt:
                pass  # a second Ctrl-C: still finish stopping before cleaning up
        raise
    if state.error is not None:
        raise state.error
    if failure:
        raise failure[0]
    if state.cancelled.is_set():
        raise KeyboardInterrupt


# ----- reading ------------------------------------------------------------------------------------
def _lazy_handler():
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    from orbax.checkpoint._src.serialization import type_handlers

    class OpenOnlyHandler(type_handlers.NumpyHandler):
        """Deserializes a leaf to an open ``tensorstore.TensorStore`` instead of reading it."""

        async def deserialize(self, infos, args=None):
            stores = []
            for info in infos:
                await info.await_path_creation()
                spec = ts_utils.build_array_read_spec(info, use_ocdbt=info.is_ocdbt_checkpoint)
                stores.append(await ts.open(ts.Spec(spec.json), open=True, context=info.ts_context))
            return stores

    return OpenOnlyHandler()


def open_lazy(params_dir: str) -> dict:
    """The params tree (or any saved pytree: a train checkpoint's state) with every leaf an open
    ``tensorstore.TensorStore``: read any slot with ``store[index].read().result()`` without loading the rest
    (what export uses)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as registry

    lazy = _lazy_handler()
    handlers = registry.create_type_handler_registry((np.ndarray, lazy))
    # Leaves were saved by the numpy handler ("np.ndarray") or by ours under the same type string.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=handlers)
    with ocp.Checkpointer(handler) as ckptr:
        item = ckptr.metadata(params_dir).item_metadata
        # An item of a CheckpointManager step (a train checkpoint's ``state``) has no step metadata file of its
        # own; the tree's metadata is still there.
        meta = item.tree if item is not None else metadata(params_dir)
        import jax
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def metadata(params_dir: str) -> dict:
    """The tree of ``ArrayMetadata`` (shape, dtype) without reading data."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.metadata(params_dir).item_metadata.tree


def logical_axes(config) -> dict:
    """The params tree of logical axis names (from ``jax.eval_shape`` of init, no memory spent)."""
    import flax.linen as nn
    import jax

    from deepseek_jax.models.transformer import abstract_params

    boxed = abstract_params(config)
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def mesh_shardings(config, mesh, meta: dict) -> dict:
    """``NamedSharding`` per leaf of ``meta`` for ``mesh``, from the model's logical axis names through the
    library's rules (``parallel/rules.py``'s ``logical_sharding``). Leaves without names (FP8 scales) are
    replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from deepseek_jax.parallel.rules import logical_sharding

    names = logical_axes(config)
    flat_names = {tuple(str(getattr(k, "key", k)) for k in p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: isinstance(x, tuple))[0]}

    def one(path, m):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        axes = flat_names.get(key)
        if axes is None or len(axes) != len(m.shape):
            return NamedSharding(mesh, PartitionSpec())
        return logical_sharding(axes, tuple(m.shape), mesh)

    return jax.tree_util.tree_map_with_path(one, meta)


def restore(params_dir: str, targets: dict) -> dict:
    """Restore onto ``jax.ShapeDtypeStruct`` targets (with shardings): each host reads only its chunks."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir, targets)
