"""An HF directory straight into (sharded) device arrays: no full tensor, and no stacked leaf, on a host.

Every leaf of the params tree gets its sharding from the logical rules (``parallel/rules.py``'s ``param_shardings``).
Each device's shard is read from the memory-mapped safetensors files by ``jax.make_array_from_callback``: only the
rows and columns of the HF tensors that the shard holds (a process reads only its own devices' shards), FP8 blocks
dequantized per shard with their own ``weight_scale_inv`` blocks. Leaves stacked over layers are filled one layer at a
time into a device buffer (a donated in-place update), so host memory holds at most one layer's shards of one leaf at
a time, whatever the number of layers.

HF layout to ours (``hf_map.TensorMap``): a linear ``[out, in]`` becomes ``[*in_dims, *out_dims]`` (the
transpose, split into heads); a shard's slice of ``in_dims`` is a set of HF columns and its slice of
``out_dims`` a set of rows, read as the bounding block and then picked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from deepseek_jax.checkpoint.hf_dir import HFCheckpoint, check_dtype, set_leaf, target_dtype
from deepseek_jax.checkpoint.hf_map import TensorMap, split_point
from deepseek_jax.checkpoint.safetensors_io import CheckpointError
from deepseek_jax.quant import fp4
from deepseek_jax.quant.weights import Fp4Weight, Fp8Weight, fp8_shardings


def _flat_positions(dims: tuple[int, ...], slices: tuple[slice, ...]) -> np.ndarray:
    """Row-major flat indices of the sub-block ``slices`` of an array of shape ``dims``."""
    ranges = [np.arange(*s.indices(d)) for s, d in zip(slices, dims)]
    return np.ravel_multi_index(np.ix_(*ranges), dims).ravel()


def read_region(ckpt: HFCheckpoint, key: str, tm: TensorMap, item: tuple[slice, ...], reads=None) -> np.ndarray:
    """The part of HF tensor ``key`` that fills our item slices ``item``, in our layout (float, FP8 dequantized).

    ``reads``, if given, receives ``(key, rows, cols)``: the HF rows and columns actually read (for tests)."""
    shape = tuple(len(range(*s.indices(d))) for s, d in zip(item, tm.item_shape))
    if tm.transpose:
        n = split_point(tm)
        cols = _flat_positions(tm.item_shape[:n], item[:n])
        rows = _flat_positions(tm.item_shape[n:], item[n:])
    elif len(tm.hf_shape) == 2:
        rows = np.arange(*item[0].indices(tm.hf_shape[0]))
        cols = np.arange(*item[1].indices(tm.hf_shape[1]))
    else:
        rows, cols = np.arange(*item[0].indices(tm.hf_shape[0])), None
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if cols is None:
        block = ckpt.read(key, (r0, r1))
        if reads is not None:
            reads.append((key, (r0, r1), None))
        return block[rows - r0].reshape(shape)
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    block = ckpt.read(key, (r0, r1), (c0, c1))
    if reads is not None:
        reads.append((key, (r0, r1), (c0, c1)))
    picked = block[np.ix_(rows - r0, cols - c0)]
    return (picked.T if tm.transpose else picked).reshape(shape)


def _callback(ckpt, tm: TensorMap, dtype, lead_of: Callable, reads) -> Callable:
    """``index -> shard data`` for ``jax.make_array_from_callback`` over a leaf (or one layer of it)."""
    n_lead = len(tm.sources[0][1])
    by_lead = dict((idx, key) for key, idx in tm.sources)

    def cb(index):
        index = tuple(index) + (slice(None),) * (len(tm.shape) - len(index))
        lead, item = lead_of(index[:n_lead]), index[n_lead:]
        out_shape = tuple(len(r) for r in lead) + tuple(len(range(*s.indices(d)))
                                                        for s, d in zip(item, tm.item_shape))
        out = np.empty(out_shape, dtype)
        for pos in np.ndindex(*[len(r) for r in lead]):
            key = by_lead[tuple(int(r[p]) for r, p in zip(lead, pos))]
            region = read_region(ckpt, key, tm, item, reads)
            if not np.isfinite(region.astype(np.float32) if region.dtype.itemsize < 4 else region).all():
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' contains NaN or Inf")
            out[pos] = region.astype(dtype)
        return out

    return cb


def check_sources(ckpt: HFCheckpoint, maps: list[TensorMap]) -> None:
    """Every source tensor has the shape config.json implies and a floating (or, for an integer leaf, integer)
    dtype (else one line naming it)."""
    for tm in maps:
        for key, _ in tm.sources:
            shape, dtype = ckpt.shape(key), ckpt.dtype(key)
            if tuple(shape) != tuple(tm.hf_shape):
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has shape {list(shape)}, expected "
                                      f"{list(tm.hf_shape)} from config.json")
            check_dtype(ckpt, key, tm, dtype)


class _RawFp8:
    """``HFCheckpoint.read`` without dequantization: the stored e4m3 values of the rows and columns asked for."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt

    def read(self, key, rows=None, cols=None):
        raw = self.ckpt.raw(key)
        if rows is None:
            return np.asarray(raw)
        return np.asarray(raw[rows[0]:rows[1]] if cols is None else raw[rows[0]:rows[1], cols[0]:cols[1]])

    def file_of(self, key):
        return self.ckpt.file_of(key)

    def release(self):
        self.ckpt.release()


class _RawFp4(_RawFp8):
    """The e2m1 codes (one per ``uint8``, unpacked from the stored bytes) of the rows and columns asked for."""

    def read(self, key, rows=None, cols=None):
        raw = self.ckpt.raw(key)
        r0, r1 = rows if rows is not None else (0, raw.shape[0])
        c0, c1 = cols if cols is not None else (0, 2 * raw.shape[1])
        return fp4.codes(raw[r0:r1, c0 // 2: -(-c1 // 2)])[:, c0 % 2: c0 % 2 + c1 - c0]


def _kept_scales(ckpt: HFCheckpoint, tm: TensorMap, dtype=np.float32) -> np.ndarray:
    """The scales of a kept FP8 (FP4) leaf in our layout: ``lead + [ceil(in / 128), ceil(out / 128)]``
    (``[in / 32, out]``), transposed with the weight."""
    first = ckpt._scales[tm.sources[0][0]]
    grid = tuple(ckpt.shape(first))[::-1]
    out = np.empty(tm.shape[:len(tm.sources[0][1])] + grid, dtype)
    for key, index in tm.sources:
        out[index] = np.asarray(ckpt.raw(ckpt._scales[key]), np.float32).T.astype(dtype)
    return out


def load_sharded(ckpt: HFCheckpoint, maps: list[TensorMap], shardings: dict, stacked: set[str], dtype=None,
                 reads=None) -> dict:
    """``params`` with every leaf of ``maps`` read shard by shard into ``shardings`` (a params-shaped tree).

    ``stacked``: the names of the layer-stacked runs (``config.layer_runs``), filled one layer at a time.
    ``dtype``: of the returned params (default: as stored; FP8 dequantized to bfloat16; the router's correction
    bias always fp32). ``dtype="fp8"``: weights stored as FP8 stay FP8, as ``quant/weights.py``'s ``Fp8Weight`` (e4m3
    values and block scales, sharded on block edges: ``fp8_shardings``), V4's FP4 experts stay FP4 (``Fp4Weight``),
    everything else as stored.
    ``reads``: a list that receives every ``(key, rows, cols)`` region read (tests)."""
    import jax
    import jax.numpy as jnp

    check_sources(ckpt, maps)
    keep_fp8 = isinstance(dtype, str) and dtype == "fp8"
    params: dict = {}
    for tm in maps:
        sharding = shardings
        for k in tm.path:
            sharding = sharding[k]
        kept = [Fp8Weight if ckpt.is_fp8(key) else Fp4Weight if ckpt.is_fp4(key) else None for key, _ in tm.sources]
        if keep_fp8 and kept[0] is not None and all(k is kept[0] for k in kept):
            set_leaf(params, tm.path, _load_kept(ckpt, tm, sharding, tm.path[0] in stacked, reads, kept[0]))
            ckpt.release()
            continue
        plain = None if keep_fp8 or dtype is None else jnp.dtype(dtype)
        target = np.dtype(target_dtype(tm, ckpt.dtype(tm.sources[0][0]), plain))
        if tm.path[0] in stacked:
            leaf = _fill_by_layer(ckpt, tm, sharding, target, reads)
        else:
            lead_dims = tm.shape[:len(tm.sources[0][1])]

            def ranges(lead_slices, lead_dims=lead_dims):
                return [np.arange(*s.indices(d)) for s, d in zip(lead_slices, lead_dims)]

            leaf = jax.make_array_from_callback(tm.shape, sharding, _callback(ckpt, tm, target, ranges, reads))
        set_leaf(params, tm.path, leaf)
        ckpt.release()
    return params


def _load_kept(ckpt: HFCheckpoint, tm: TensorMap, sharding, stacked: bool, reads, cls=Fp8Weight):
    """An FP8 (``cls=Fp4Weight``: FP4) leaf kept as stored: the e4m3 values (e2m1 codes as ``uint4``) read shard
    by shard, the scales (fp32; FP4's e8m0 ones as bf16, exactly) beside them on block edges."""
    import jax
    import ml_dtypes

    fp4_kept = cls is Fp4Weight
    raw = _RawFp4(ckpt) if fp4_kept else _RawFp8(ckpt)
    stored = np.dtype(ml_dtypes.uint4 if fp4_kept else ml_dtypes.float8_e4m3fn)
    n_in = split_point(tm)
    n_out = len(tm.item_shape) - n_in
    if fp4_kept and tm.hf_shape[1] % fp4.GROUP:
        raise CheckpointError(f"{ckpt.file_of(tm.sources[0][0])}: tensor '{tm.sources[0][0]}': FP4 weights are kept "
                              f"on the devices only when their input dim is a multiple of {fp4.GROUP}; found "
                              f"{tm.hf_shape[1]}")
    q_sharding, scale_sharding = fp8_shardings(sharding, tm.shape, n_in, n_out, cls.BLOCKS)
    if stacked:
        q = _fill_by_layer(raw, tm, q_sharding, stored, reads)
    else:
        lead_dims = tm.shape[:len(tm.sources[0][1])]

        def ranges(lead_slices):
            return [np.arange(*s.indices(d)) for s, d in zip(lead_slices, lead_dims)]

        q = jax.make_array_from_callback(tm.shape, q_sharding, _callback(raw, tm, stored, ranges, reads))
    e8m0 = ckpt.dtype(ckpt._scales[tm.sources[0][0]]) == np.dtype(ml_dtypes.float8_e8m0fnu)
    scales = _kept_scales(ckpt, tm, ml_dtypes.bfloat16 if fp4_kept and e8m0 else np.float32)
    return cls(q, jax.device_put(scales, scale_sharding), n_in, n_out)


def _fill_by_layer(ckpt, tm: TensorMap, sharding, dtype, reads):
    """A layer-stacked leaf built on the devices one layer at a time (host memory: one layer's shards)."""
    import jax
    import jax.numpy as jnp

    layers = tm.shape[0]
    n_lead = len(tm.sources[0][1])
    put = jax.jit(lambda buf, x, i: jax.lax.dynamic_update_index_in_dim(buf, x[0], i, 0), donate_argnums=0,
                  out_shardings=sharding)
    buf = jax.jit(lambda: jnp.zeros(tm.shape, dtype), out_shardings=sharding)()
    layer_shape = (1,) + tm.shape[1:]
    for layer in range(layers):
        def ranges(lead_slices, layer=layer):
            rest = [np.arange(*s.indices(d)) for s, d in zip(lead_slices[1:], tm.shape[1:n_lead])]
            return [np.asarray([layer])] + rest

        x = jax.make_array_from_callback(layer_shape, sharding, _callback(ckpt, tm, dtype, ranges, reads))
        buf = put(buf, x, layer)
        ckpt.release()
    return buf
