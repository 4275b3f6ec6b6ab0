"""``load_pretrained``: params from any checkpoint directory the library reads (HF safetensors, FP8 releases
included; a ``deepseek-jax convert`` directory; a ``deepseek-jax train`` work directory)."""

from __future__ import annotations

import os

import jax

from deepseek_jax.checkpoint.converted import load_converted
from deepseek_jax.checkpoint.hf_dir import HFCheckpoint, check_keys, drop_absent_mtp
from deepseek_jax.checkpoint.hf_map import hf_tensor_map
from deepseek_jax.checkpoint.orbax_io import is_converted_dir
from deepseek_jax.checkpoint.sharded_load import load_sharded
from deepseek_jax.checkpoint.train_dir import is_train_workdir, load_train_checkpoint
from deepseek_jax.config.model import FP32_LEAVES, ModelConfig
from deepseek_jax.models.transformer import abstract_params
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.rules import param_shardings


def pretrained_config(path: str | os.PathLike) -> ModelConfig:
    """The config ``load_pretrained(path)`` returns, without reading any weight (for an HF directory with no MTP
    tensors: ``num_nextn_predict_layers = 0``, see ``drop_absent_mtp``)."""
    path = os.fspath(path)
    config = ModelConfig.from_pretrained(path)
    if is_converted_dir(path) or is_train_workdir(path):
        return config
    return drop_absent_mtp(HFCheckpoint(path), config)


def default_shardings(config: ModelConfig, mesh=None):
    """The params' shardings by the logical rules on ``mesh`` (default: the first device)."""
    mesh = mesh if mesh is not None else make_mesh(None, jax.devices()[:1])
    return param_shardings(abstract_params(config), mesh)


def load_pretrained(path: str | os.PathLike, dtype=None, mesh=None, shardings=None):
    """``(config, params)`` from an HF-format directory (``config.json`` + safetensors, sharded or not) or
    a directory written by ``deepseek-jax convert`` (Orbax), or a ``deepseek-jax train`` work directory (its latest
    checkpoint's params).

    dtype: dtype of the returned params (default: as stored; FP8 weights are dequantized to bfloat16).
    The router's ``e_score_correction_bias`` is always fp32. ``dtype="fp8"``: weights stored in FP8 (an FP8 HF
    release, or a ``convert --keep-fp8`` directory) stay FP8 on the devices, as ``quant/weights.py``'s
    ``Fp8Weight`` (e4m3 values + 128x128 block scales, dequantized where a matmul reads them); the other params as
    stored.
    mesh / shardings: load straight onto a ``jax.sharding.Mesh``, each process reading only its own devices'
    shards (the byte ranges of the HF tensors they hold, FP8 blocks dequantized per shard; an Orbax directory's
    chunks); ``shardings`` (a params-shaped tree of ``Sharding``) overrides the default mapping of logical axes
    onto the mesh axes. Without either the params land on the default device, read the same way; no full
    layer-stacked array is ever assembled in host memory.
    """
    path = os.fspath(path)
    if is_converted_dir(path):
        return load_converted(path, dtype=dtype, mesh=mesh, shardings=shardings)
    if is_train_workdir(path):
        if isinstance(dtype, str) and dtype == "fp8":
            raise ValueError(f"{path}: a train work directory holds no FP8 weights to keep (dtype='fp8' keeps the "
                             f"FP8 weights of an FP8 release or a `convert --keep-fp8` directory)")
        if shardings is None and mesh is not None:
            shardings = default_shardings(ModelConfig.from_pretrained(path), mesh)
        config, params = load_train_checkpoint(path, shardings=shardings, load_base=load_pretrained)
        if dtype is not None:  # the router's correction bias (and V4's hash table) stay fp32
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: x if str(getattr(p[-1], "key", "")) in FP32_LEAVES else x.astype(dtype),
                params)
        return config, params
    config = ModelConfig.from_pretrained(path)
    ckpt = HFCheckpoint(path)
    config = drop_absent_mtp(ckpt, config)
    maps = hf_tensor_map(config)
    check_keys(ckpt, config, maps)
    if shardings is None:
        shardings = default_shardings(config, mesh)
    stacked = {name for name, _, _ in config.layer_runs}
    return config, load_sharded(ckpt, maps, shardings, stacked, dtype)
