"""``load_pretrained`` for a converted (Orbax) directory: restore onto one device or onto a mesh."""

from __future__ import annotations

import os

import numpy as np

from deepseek_jax.checkpoint.hf_dir import set_leaf
from deepseek_jax.checkpoint.hf_map import hf_tensor_map, split_point
from deepseek_jax.checkpoint.orbax_io import (
    PARAMS_DIR,
    SCALE_SUFFIX,
    is_converted_dir,
    mesh_shardings,
    metadata,
    read_marker,
    restore,
)
from deepseek_jax.config.model import ModelConfig
from deepseek_jax.quant.weights import Fp8Weight, fp8_shardings

__all__ = ["is_converted_dir", "load_converted"]


def _flat(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def load_converted(path: str | os.PathLike, dtype=None, mesh=None, shardings=None):
    """``(config, params)`` from ``deepseek-jax convert`` output.

    dtype: dtype of the returned params (default: as stored; kept FP8 weights are dequantized to bfloat16);
        "fp8": kept FP8 weights stay FP8 (``quant/weights.py``'s ``Fp8Weight``), the other params as stored.
    mesh: restore each leaf as a ``jax.Array`` sharded over ``mesh`` (logical axes mapped by
        ``parallel/rules.py``'s rules); shardings: a params-shaped tree of ``Sharding`` to use instead.
    Without either, params land on the default device.
    """
    import jax
    import jax.numpy as jnp

    path = os.fspath(path)
    keep_fp8 = isinstance(dtype, str) and dtype == "fp8"
    if keep_fp8:
        dtype = None
    read_marker(path)
    config = ModelConfig.from_pretrained(path)
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    meta = metadata(params_dir)
    if shardings is None:
        if mesh is not None:
            shardings = mesh_shardings(config, mesh, meta)
        else:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda m: one, meta)
    maps = {tm.path: tm for tm in hf_tensor_map(config)}
    flat_meta, flat_sh = _flat(meta), _flat(shardings)
    fp8_paths = {p[:-1] + (p[-1][: -len(SCALE_SUFFIX)],) for p in flat_meta if p[-1].endswith(SCALE_SUFFIX)}

    def target_dtype(p, m):
        stored = np.dtype(m.dtype)
        if p in fp8_paths or p[-1].endswith(SCALE_SUFFIX) or dtype is None:
            return stored
        if p in maps and maps[p].keep_fp32:
            return np.dtype(np.float32)
        return np.dtype(jnp.dtype(dtype))

    def fp8_leaf_shardings(p):  # kept: both on 128-block edges; dequantized: the weight as any kernel, scales whole
        tm, sh = maps[p], flat_sh[p]
        if keep_fp8:
            n_in = split_point(tm)
            return fp8_shardings(sh, tuple(flat_meta[p].shape), n_in, len(tm.item_shape) - n_in)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else sh
        return sh, rep

    targets: dict = {}
    for p, m in flat_meta.items():
        sh = flat_sh[p]
        if p in fp8_paths:
            sh = fp8_leaf_shardings(p)[0]
        elif p[-1].endswith(SCALE_SUFFIX):
            sh = fp8_leaf_shardings(p[:-1] + (p[-1][: -len(SCALE_SUFFIX)],))[1]
        set_leaf(targets, p, jax.ShapeDtypeStruct(tuple(m.shape), target_dtype(p, m), sharding=sh))
    params = restore(params_dir, targets)
    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.bfloat16
    for p in sorted(fp8_paths):
        parent = params
        for k in p[:-1]:
            parent = parent[k]
        w8, s = parent[p[-1]], parent.pop(p[-1] + SCALE_SUFFIX)
        tm = maps[p]
        n_in = split_point(tm)
        kept = Fp8Weight(w8, s, n_in, len(tm.item_shape) - n_in)
        if keep_fp8:
            parent[p[-1]] = kept
            continue
        parent[p[-1]] = jax.jit(lambda w: w.dequantize(out_dtype), out_shardings=w8.sharding)(kept)
    return config, params
