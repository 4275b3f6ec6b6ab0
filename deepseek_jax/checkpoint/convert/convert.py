"""``deepseek-jax convert SRC DST``: HF safetensors (fp32 / bf16 / fp16 / FP8 block-quantized) or a PyTorch
state dict -> Orbax params tree in the scanned layout, streaming one source tensor at a time.

Memory: every leaf is written slot by slot (one source tensor: one layer's attention weight, one expert's
projection), the source files are unmapped after each tensor, so peak RSS follows the largest source tensor,
not the number of layers. Nothing is left behind on failure: everything is written to a temp directory beside
DST and renamed at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Iterator, Optional

import ml_dtypes
import numpy as np

from deepseek_jax.checkpoint import orbax_io
from deepseek_jax.checkpoint.convert.torch_io import (
    TORCH_INDEX,
    TORCH_SUFFIXES,
    open_files_checkpoint,
)
from deepseek_jax.checkpoint.hf_dir import (
    INDEX_FILE,
    SINGLE_FILE,
    HFCheckpoint,
    check_dtype,
    check_keys,
    drop_absent_mtp,
    iter_leaves,
    set_leaf,
)
from deepseek_jax.checkpoint.hf_map import TensorMap, hf_tensor_map
from deepseek_jax.checkpoint.orbax_io import (
    MARKER_FILE,
    PARAMS_DIR,
    SCALE_SUFFIX,
    StreamedLeaf,
    WriteState,
)
from deepseek_jax.checkpoint.safetensors_io import CheckpointError
from deepseek_jax.config.model import ModelConfig, read_config_json
from deepseek_jax.quant import fp4
from deepseek_jax.quant.blocks import BLOCK, E4M3, block_grid

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
FLOAT_SOURCES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64))
FP8 = np.dtype(E4M3)
# Small files of a hub directory that are carried along (tokenizer, generation config) for export.
EXTRA_FILES_DIR = "hf_files"
_WEIGHT_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
_SKIP = {"config.json", INDEX_FILE, TORCH_INDEX}
_EXTRA_MAX_BYTES = 64 * 1024 * 1024
# Slots read ahead on reader threads. Peak memory is about (PREFETCH + MAX_WRITES_IN_FLIGHT + 2) slots.
PREFETCH = 2
READER_THREADS = 2


# ----- opening a source -----------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    ckpt: HFCheckpoint
    config: ModelConfig
    config_dict: dict
    config_file: str
    maps: list[TensorMap]
    pool: Optional[concurrent.futures.ThreadPoolExecutor] = None  # reads slots ahead (safetensors only)
    _local: threading.local = dataclasses.field(default_factory=threading.local)

    def reader(self) -> HFCheckpoint:
        """The checkpoint for this thread: reader threads each map the files on their own, so one thread
        unmapping after a tensor never pulls the map from under another."""
        if self.pool is None or threading.current_thread() is threading.main_thread():
            return self.ckpt
        if not hasattr(self._local, "ckpt"):
            self._local.ckpt = HFCheckpoint(self.ckpt.path)
        return self._local.ckpt


def _read_config(config_file: str) -> tuple[dict, ModelConfig]:
    try:
        d = read_config_json(config_file)
    except FileNotFoundError:
        raise CheckpointError(f"{config_file}: no config.json found (pass --config)") from None
    return d, ModelConfig.from_hf_dict(d, source=config_file)


def open_source(src: str, config_file: Optional[str] = None) -> Source:
    """Config first (an unsupported architecture fails before any tensor is touched), then the tensors'
    headers; checks the key set against the config (missing / extra tensors)."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: does not exist")
    base = src if os.path.isdir(src) else (os.path.dirname(src) or ".")
    config_file = config_file or os.path.join(base, "config.json")
    config_dict, config = _read_config(config_file)
    if os.path.isdir(src) and (os.path.exists(os.path.join(src, INDEX_FILE)) or
                               os.path.exists(os.path.join(src, SINGLE_FILE))):
        ckpt = HFCheckpoint(src)
    elif os.path.isdir(src) or src.endswith(_WEIGHT_SUFFIXES):
        ckpt = open_files_checkpoint(src)
    else:
        raise CheckpointError(f"{src}: not a checkpoint directory or a .safetensors/.bin/.pt/.pth file")
    config = drop_absent_mtp(ckpt, config)
    maps = hf_tensor_map(config)
    check_keys(ckpt, config, maps)
    _check_headers(ckpt, maps)
    return Source(ckpt, config, config_dict, config_file, maps)


def _check_headers(ckpt: HFCheckpoint, maps: list[TensorMap]) -> None:
    """Shapes and dtypes of every source against config.json, from the headers alone (before writing)."""
    for tm in maps:
        for key, _ in tm.sources:
            shape, dtype = tuple(ckpt.shape(key)), np.dtype(ckpt.dtype(key))
            where = f"{ckpt.file_of(key)}: tensor '{key}'"
            if shape != tuple(tm.hf_shape):
                raise CheckpointError(f"{where} has shape {list(shape)}, expected {list(tm.hf_shape)} from config.json")
            if ckpt.is_fp8(key):
                if dtype != FP8:
                    raise CheckpointError(f"{where} has a weight_scale_inv but dtype {dtype}, expected float8_e4m3fn")
                skey = key + "_scale_inv"
                want = block_grid(shape)
                sshape, sdtype = tuple(ckpt.shape(skey)), np.dtype(ckpt.dtype(skey))
                if sshape != want or sdtype not in fp4.SCALE_DTYPES:
                    raise CheckpointError(f"{ckpt.file_of(skey)}: tensor '{skey}' is {sdtype}{list(sshape)}, "
                                          f"expected float32 or float8_e8m0fnu{list(want)} ({BLOCK}x{BLOCK} blocks "
                                          f"of {list(shape)})")
            elif ckpt.is_fp4(key):
                skey, want = key + "_scale_inv", fp4.scale_shape(shape)
                sshape, sdtype = tuple(ckpt.shape(skey)), np.dtype(ckpt.dtype(skey))
                if sshape != want or sdtype not in fp4.SCALE_DTYPES:
                    raise CheckpointError(f"{ckpt.file_of(skey)}: tensor '{skey}' is {sdtype}{list(sshape)}, "
                                          f"expected float8_e8m0fnu or float32{list(want)} (one scale per row "
                                          f"and {fp4.GROUP} inputs of the FP4 weight {list(shape)})")
            elif dtype == FP8:
                raise CheckpointError(f"{where} is float8_e4m3fn but has no '{key}_scale_inv' beside it")
            elif tm.integer:
                check_dtype(ckpt, key, tm, dtype)
            elif dtype not in FLOAT_SOURCES:
                raise CheckpointError(f"{where} has dtype {dtype}, expected a floating-point type "
                                      f"(float32, bfloat16, float16, or float8_e4m3fn with block scales)")
    wanted = {k for tm in maps for k, _ in tm.sources}
    for key in ckpt._scales:  # a scale with no weight it belongs to
        if key not in wanted and key not in ckpt.keys:
            skey = ckpt._scales[key]
            raise CheckpointError(f"{ckpt.file_of(skey)}: unexpected tensor '{skey}' (no weight '{key}')")


# ----- the conversion plan ------------------------------------------------------------------------
@dataclasses.dataclass
class Leaf:
    tm: TensorMap
    dtype: np.dtype
    keep_fp8: bool  # stored as e4m3fn with a ``<name>_scale_inv`` sibling leaf

    @property
    def lead(self) -> int:
        return len(self.tm.sources[0][1])

    @property
    def scale_path(self) -> tuple[str, ...]:
        return self.tm.path[:-1] + (self.tm.path[-1] + SCALE_SUFFIX,)

    def scale_shape(self) -> tuple[int, ...]:
        out, inp = self.tm.hf_shape  # the scale is transposed with the weight: [in blocks, out blocks]
        return self.tm.shape[: self.lead] + block_grid((inp, out))


def plan(source: Source, dtype: str = "bfloat16", keep_fp8: bool = False) -> list[Leaf]:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    ckpt, leaves = source.ckpt, []
    for tm in source.maps:
        fp8 = [ckpt.is_fp8(k) for k, _ in tm.sources]
        kept = keep_fp8 and all(fp8)
        if keep_fp8 and any(fp8) and not kept:
            k = next(k for (k, _), f in zip(tm.sources, fp8) if not f)
            raise CheckpointError(f"{ckpt.file_of(k)}: tensor '{k}' is not FP8 while others of "
                                  f"{'/'.join(tm.path)} are; --keep-fp8 needs all or none")
        if tm.keep_fp32:
            leaf_dtype = np.dtype(np.float32)
        else:
            leaf_dtype = FP8 if kept else DTYPES[dtype]
        leaves.append(Leaf(tm, leaf_dtype, kept))
    return leaves


def _source_bytes(ckpt: HFCheckpoint, leaves: list[Leaf]) -> int:
    return sum(ckpt.nbytes(k) for leaf in leaves for k, _ in leaf.tm.sources)


def describe_plan(source: Source, leaves: list[Leaf]) -> str:
    """The ``--dry-run`` table: our leaf, shape, dtype, where it comes from, bytes in and out."""
    ckpt = source.ckpt
    rows = [("leaf", "shape", "dtype", "sources", "first source", "bytes in", "bytes out")]
    total_in = total_out = 0
    for leaf in leaves:
        tm = leaf.tm
        b_in = sum(ckpt.nbytes(k) for k, _ in tm.sources)
        b_out = int(np.prod(tm.shape, dtype=np.int64)) * leaf.dtype.itemsize
        if leaf.keep_fp8:
            b_out += int(np.prod(leaf.scale_shape(), dtype=np.int64)) * 4
        total_in, total_out = total_in + b_in, total_out + b_out
        first = tm.sources[0][0]
        src_dt = str(ckpt.dtype(first)) + ("+scale" if ckpt.is_fp8(first) else "")
        src_dt = "fp4+scale" if ckpt.is_fp4(first) else src_dt
        rows.append(("/".join(tm.path), "x".join(map(str, tm.shape)), f"{src_dt}->{leaf.dtype}",
                     str(len(tm.sources)), first, _human(b_in), _human(b_out)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    c = source.config
    lines.append(f"{len(leaves)} leaves from {sum(len(l.tm.sources) for l in leaves)} source tensors; "
                 f"{_human(total_in)} read, {_human(total_out)} written; model_type={c.model_type}, "
                 f"{c.num_hidden_layers} layers, {c.num_nextn_predict_layers} MTP")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# ----- streaming the leaves -----------------------------------------------------------------------
def _check_finite(ckpt: HFCheckpoint, key: str, x: np.ndarray) -> None:
    if not np.isfinite(np.asarray(x, np.float32)).all():
        raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' contains NaN or Inf")


def _slot(source: Source, tm: TensorMap, key: str, dtype: np.dtype) -> np.ndarray:
    """One source tensor in our layout, through ``iter_leaves`` (the same checks as ``load_pretrained``)."""
    ckpt = source.reader()
    one = dataclasses.replace(tm, shape=tm.item_shape, sources=((key, ()),))
    _, arr = next(iter_leaves(ckpt, source.config, [one], dtype=dtype))
    ckpt.release()  # unmap: the pages just read stop counting toward RSS
    return arr


def _slots(source: Source, leaf: Leaf, progress) -> Iterator[tuple[tuple, np.ndarray]]:
    """The leaf's slots in order; with ``source.pool`` the next ``PREFETCH`` are read on other threads."""
    tm = leaf.tm
    if source.pool is None:
        for key, index in tm.sources:
            yield index, _slot(source, tm, key, leaf.dtype)
            if progress is not None:
                progress.update(source.ckpt.nbytes(key))
        return
    pending: collections.deque = collections.deque()
    todo = iter(tm.sources)
    try:
        for key, index in todo:
            pending.append((key, index, source.pool.submit(_slot, source, tm, key, leaf.dtype)))
            if len(pending) > PREFETCH:
                break
        while pending:
            key, index, fut = pending.popleft()
            arr = fut.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], source.pool.submit(_slot, source, tm, nxt[0], leaf.dtype)))
            yield index, arr
            del arr
            if progress is not None:
                progress.update(source.ckpt.nbytes(key))
    finally:
        for _, _, fut in pending:
            fut.cancel()


def _fp8_slots(source: Source, leaf: Leaf, progress, scales: bool) -> Iterator[tuple[tuple, np.ndarray]]:
    """``--keep-fp8``: the e4m3fn weight (or its scale) as stored, transposed into our layout."""
    ckpt, tm = source.ckpt, leaf.tm
    for key, index in tm.sources:
        if scales:
            s = np.array(ckpt.raw(key + "_scale_inv"), np.float32)
            _check_finite(ckpt, key + "_scale_inv", s)
            out = s.T if tm.transpose else s
        else:
            w8 = np.array(ckpt.raw(key))
            _check_finite(ckpt, key, w8)
            out = tm.to_ours(w8)
            if progress is not None:
                progress.update(ckpt.nbytes(key))
        ckpt.release()
        yield index, out


def _mtp_copies(source: Source) -> dict:
    """Whether the MTP layers' copies of the embedding / head (not loaded) equal the main ones; export writes
    them back only if the source had them. Compared in row blocks (bounded memory)."""
    ckpt, c, out = source.ckpt, source.config, {}
    have = set(ckpt.keys)
    for name, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                       ("shared_head.head.weight", "lm_head.weight")):
        keys = [f"model.layers.{c.num_hidden_layers + k}.{name}" for k in range(c.num_nextn_predict_layers)]
        present = [k for k in keys if k in have]
        if not present:
            out[name] = False
            continue
        same = True
        for key in present:
            a, b = ckpt.read(main), ckpt.read(key)
            if a.shape != b.shape or a.dtype != b.dtype:
                same = False
            else:
                step = max(1, (64 << 20) // max(1, a[0].nbytes))
                same = same and all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.shape[0], step))
            del a, b
            ckpt.release()
        if not same:
            warnings.warn(f"{source.ckpt.path}: '{present[0]}' differs from '{main}'; the model uses '{main}' "
                          f"(as DeepSeek's MTP does), the copy is dropped")
        out[name] = same
    return out


# ----- output directory handling ------------------------------------------------------------------
class AtomicDir:
    """A temp directory beside ``dst``, renamed to ``dst`` on success and removed on any failure or Ctrl-C.

    With ``force`` an existing ``dst`` is replaced only once the new output is complete, and survives any
    failure before that."""

    def __init__(self, dst: str, force: bool = False):
        self.dst = os.path.abspath(os.fspath(dst))
        self.force = force
        if os.path.exists(self.dst) and not force:
            raise FileExistsError(f"{self.dst}: already exists (pass --force to replace it)")
        parent = os.path.dirname(self.dst)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"{parent}: output's parent directory does not exist")
        self.tmp = None

    def __enter__(self) -> str:
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.tmp-", dir=os.path.dirname(self.dst))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for the temp phase only
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for _ in range(50):  # a writer thread may still be closing a file: retry briefly
                shutil.rmtree(self.tmp, ignore_errors=True)
                if not os.path.exists(self.tmp):
                    break
                time.sleep(0.1)
            return False
        try:
            orbax_io.fsync_tree(self.tmp)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        # --force: the old output moves aside and is deleted only once the new one is in its place; if the
        # swap fails, it moves back.
        old = None
        if os.path.lexists(self.dst):
            old = f"{self.tmp}.replaced"
            os.rename(self.dst, old)
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            if old is not None:
                os.rename(old, self.dst)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
        return False


def _copy_extras(src: str, out_dir: str) -> list[str]:
    """Tokenizer and other small files of the source directory, kept for ``export``."""
    base = src if os.path.isdir(src) else os.path.dirname(src) or "."
    copied = []
    for name in sorted(os.listdir(base)):
        p = os.path.join(base, name)
        if (name in _SKIP or name.endswith(_WEIGHT_SUFFIXES) or name.startswith(".") or not os.path.isfile(p)
                or os.path.getsize(p) > _EXTRA_MAX_BYTES):
            continue
        os.makedirs(os.path.join(out_dir, EXTRA_FILES_DIR), exist_ok=True)
        shutil.copy2(p, os.path.join(out_dir, EXTRA_FILES_DIR, name))
        copied.append(name)
    return copied


def _output_config(source: Source, keep_fp8: bool) -> dict:
    d = dict(source.config_dict)
    d["num_nextn_predict_layers"] = source.config.num_nextn_predict_layers
    if "num_mtp_layers" in d:
        d["num_mtp_layers"] = source.config.num_nextn_predict_layers
    if not keep_fp8:
        d.pop("quantization_config", None)
    return d


@contextlib.contextmanager
def _shutdown(pool):
    try:
        yield
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


@contextlib.contextmanager
def _sigint_cancels(state: WriteState):
    """While converting, Ctrl-C only sets the cancel flag: the writer stops at the next tensor and the caller
    raises ``KeyboardInterrupt`` at a known point. (Python's default handler raises it wherever the main
    thread happens to be, a garbage-collection callback included, where it is swallowed.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: state.cancelled.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def convert(src: str, dst: str, dtype: str = "bfloat16", keep_fp8: bool = False, config_file: Optional[str] = None,
            progress: bool = True, force: bool = False) -> dict:
    """Convert ``src`` to a converted directory at ``dst``; returns a summary (bytes, seconds)."""
    source = open_source(src, config_file)
    leaves = plan(source, dtype, keep_fp8)
    if keep_fp8 and not any(l.keep_fp8 for l in leaves):
        warnings.warn(f"{src}: --keep-fp8 given but the checkpoint has no FP8 weights")
    total = _source_bytes(source.ckpt, leaves)
    if type(source.ckpt) is HFCheckpoint:  # safetensors directories: cheap to map once per reader thread
        source.pool = concurrent.futures.ThreadPoolExecutor(READER_THREADS, thread_name_prefix="convert-read")
    t0 = time.perf_counter()
    state = WriteState()
    with _sigint_cancels(state), AtomicDir(dst, force) as tmp, _shutdown(source.pool):
        copies = _mtp_copies(source)
        bar = progress_bar(total, "convert", progress)
        tree: dict = {}
        for leaf in leaves:
            tm = leaf.tm
            if leaf.keep_fp8:
                set_leaf(tree, tm.path, StreamedLeaf(tm.shape, FP8, leaf.lead,
                                                     lambda l=leaf: _fp8_slots(source, l, bar, scales=False)))
                set_leaf(tree, leaf.scale_path, StreamedLeaf(leaf.scale_shape(), np.float32, leaf.lead,
                                                             lambda l=leaf: _fp8_slots(source, l, None, scales=True)))
            else:
                set_leaf(tree, tm.path, StreamedLeaf(tm.shape, leaf.dtype, leaf.lead,
                                                     lambda l=leaf: _slots(source, l, bar)))
        try:
            orbax_io.save_streamed(os.path.join(tmp, PARAMS_DIR), tree, state)
        finally:
            if bar is not None:
                bar.close()
            source.ckpt.release()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_output_config(source, keep_fp8), f, indent=2)
        extras = _copy_extras(src, tmp)
        marker = {
            "format": orbax_io.FORMAT, "version": 1, "dtype": dtype, "fp8": any(l.keep_fp8 for l in leaves),
            "scale_fmt": source.config_dict.get("quantization_config", {}).get("scale_fmt") if keep_fp8 else None,
            "mtp_copies": copies, "source": os.path.abspath(src), "source_bytes": total, "hf_files": extras,
            # Per leaf, the dtype its tensors had in the source: export writes them back in it by default.
            "source_dtypes": {"/".join(l.tm.path): np.dtype(source.ckpt.dtype(l.tm.sources[0][0])).name
                              for l in leaves},
        }
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            json.dump(marker, f, indent=2)
        if state.cancelled.is_set():  # Ctrl-C after the last tensor: still nothing left behind
            raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "config": source.config}
