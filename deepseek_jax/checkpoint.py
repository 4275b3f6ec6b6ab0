"""HF checkpoint layout <-> our params pytree (REFERENCE.md section 4), and ``load_pretrained``.

``hf_tensor_map(config)`` is the one description of the mapping: for every leaf of our (scanned) params tree,
which HF tensors fill it, at which index of the stacked layer / expert dims, and how each is laid out
(``[out, in]`` PyTorch linears are transposed to ``[in, out]`` and split into heads). ``load_pretrained``
and the streaming converter both walk it, one source tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Iterator, Optional

import ml_dtypes
import numpy as np

from .config import ModelConfig
from .safetensors_io import CheckpointError, SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One leaf of our params tree and the HF tensors that fill it.

    path: the leaf's path in the params tree.
    shape: the leaf's full shape, stacked dims (layers, experts) first.
    sources: ``(hf_key, index)`` pairs; ``index`` addresses the stacked leading dims (``()`` when none).
    hf_shape: the shape every source has in the checkpoint.
    transpose: True for linear weights stored ``[out, in]``.
    keep_fp32: stored and kept in fp32 whatever the requested dtype (the router's correction bias).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    hf_shape: tuple[int, ...]
    transpose: bool = False
    keep_fp32: bool = False

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one source once in our layout (the leaf's shape without the stacked dims)."""
        return self.shape[len(self.sources[0][1]):]

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """One source tensor in HF layout -> our layout for its slot."""
        x = hf.T if self.transpose else hf
        return x.reshape(self.item_shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Inverse of ``to_ours`` for one slot (used by export)."""
        if self.transpose:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


def _layer_templates(c: ModelConfig, moe: bool):
    """Per-layer leaves: (path inside the block, HF suffix, our shape, HF shape, transpose)."""
    d, h, r = c.hidden_size, c.num_attention_heads, c.kv_lora_rank
    qk, nv = c.qk_head_dim, c.qk_nope_head_dim + c.v_head_dim
    t = [
        (("input_layernorm", "scale"), "input_layernorm.weight", (d,), (d,), False),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,), (d,), False),
    ]
    a = "self_attn"
    if not c.uses_mla:
        return t + _gqa_templates(c)
    if c.q_lora_rank is None:
        t.append(((a, "q_proj", "kernel"), f"{a}.q_proj.weight", (d, h, qk), (h * qk, d), True))
    else:
        q = c.q_lora_rank
        t += [
            ((a, "q_a_proj", "kernel"), f"{a}.q_a_proj.weight", (d, q), (q, d), True),
            ((a, "q_a_layernorm", "scale"), f"{a}.q_a_layernorm.weight", (q,), (q,), False),
            ((a, "q_b_proj", "kernel"), f"{a}.q_b_proj.weight", (q, h, qk), (h * qk, q), True),
        ]
    t += [
        ((a, "kv_a_proj_with_mqa", "kernel"), f"{a}.kv_a_proj_with_mqa.weight", (d, c.kv_cache_dim),
         (c.kv_cache_dim, d), True),
        ((a, "kv_a_layernorm", "scale"), f"{a}.kv_a_layernorm.weight", (r,), (r,), False),
        ((a, "kv_b_proj", "kernel"), f"{a}.kv_b_proj.weight", (r, h, nv), (h * nv, r), True),
        ((a, "o_proj", "kernel"), f"{a}.o_proj.weight", (h, c.v_head_dim, d), (d, h * c.v_head_dim), True),
    ]
    if not moe:
        i = c.intermediate_size
        t += [
            (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (d, i), (i, d), True),
            (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (d, i), (i, d), True),
            (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (i, d), (d, i), True),
        ]
        return t
    e, i = c.n_routed_experts, c.moe_intermediate_size
    t.append((("mlp", "gate", "kernel"), "mlp.gate.weight", (d, e), (e, d), True))
    if c.has_correction_bias:
        t.append((("mlp", "gate", "e_score_correction_bias"), "mlp.gate.e_score_correction_bias", (e,), (e,), False))
    # Routed experts: one HF tensor per expert, "{e}" is filled in by the caller.
    t += [
        (("mlp", "experts", "gate_proj"), "mlp.experts.{e}.gate_proj.weight", (d, i), (i, d), True),
        (("mlp", "experts", "up_proj"), "mlp.experts.{e}.up_proj.weight", (d, i), (i, d), True),
        (("mlp", "experts", "down_proj"), "mlp.experts.{e}.down_proj.weight", (i, d), (d, i), True),
    ]
    if c.n_shared_experts > 0:
        s = c.n_shared_experts * i
        t += [
            (("mlp", "shared_experts", "gate_proj", "kernel"), "mlp.shared_experts.gate_proj.weight", (d, s), (s, d), True),
            (("mlp", "shared_experts", "up_proj", "kernel"), "mlp.shared_experts.up_proj.weight", (d, s), (s, d), True),
            (("mlp", "shared_experts", "down_proj", "kernel"), "mlp.shared_experts.down_proj.weight", (s, d), (d, s), True),
        ]
    return t


def _gqa_templates(c: ModelConfig):
    """A dense student's layer (Qwen2 / Llama): q/k/v/o projections (biases per ``config.qkv_bias``) and the
    dense MLP."""
    d, h, k, e, i, a = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim,
                        c.intermediate_size, "self_attn")
    t = []
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        t.append(((a, name, "kernel"), f"{a}.{name}.weight", (d, heads, e), (heads * e, d), True))
        if c.qkv_bias:
            t.append(((a, name, "bias"), f"{a}.{name}.bias", (heads, e), (heads * e,), False))
    t.append(((a, "o_proj", "kernel"), f"{a}.o_proj.weight", (h, e, d), (d, h * e), True))
    if c.model_type == "llama" and c.attention_bias:
        t.append(((a, "o_proj", "bias"), f"{a}.o_proj.bias", (d,), (d,), False))
    t += [
        (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (d, i), (i, d), True),
        (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (d, i), (i, d), True),
        (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (i, d), (d, i), True),
    ]
    return t


def _block_maps(c: ModelConfig, prefix: tuple[str, ...], layers: list[int], moe: bool, stacked: bool):
    out = []
    for path, suffix, shape, hf_shape, transpose in _layer_templates(c, moe):
        per_expert = "{e}" in suffix
        lead = ((len(layers),) if stacked else ()) + ((c.n_routed_experts,) if per_expert else ())
        sources = []
        for j, layer in enumerate(layers):
            base = f"model.layers.{layer}."
            li = (j,) if stacked else ()
            if per_expert:
                sources += [(base + suffix.format(e=e), li + (e,)) for e in range(c.n_routed_experts)]
            else:
                sources.append((base + suffix, li))
        out.append(TensorMap(prefix + path, lead + shape, tuple(sources), hf_shape, transpose,
                             keep_fp32=suffix.endswith("e_score_correction_bias")))
    return out


def hf_tensor_map(config: ModelConfig) -> list[TensorMap]:
    """Every leaf of the params tree with its HF sources (main model and MTP modules)."""
    c = config
    d, v = c.hidden_size, c.vocab_size
    maps = [
        TensorMap(("embed_tokens", "embedding"), (v, d), (("model.embed_tokens.weight", ()),), (v, d)),
        TensorMap(("norm", "scale"), (d,), (("model.norm.weight", ()),), (d,)),
    ]
    if not c.tie_word_embeddings:  # a tied head is the embedding (no lm_head.weight in the checkpoint)
        maps.append(TensorMap(("lm_head", "kernel"), (d, v), (("lm_head.weight", ()),), (v, d), transpose=True))
    for name, start, length in c.layer_runs:
        maps += _block_maps(c, (name,), list(range(start, start + length)), name.startswith("moe"), stacked=True)
    for k in range(c.num_nextn_predict_layers):
        idx = c.num_hidden_layers + k
        base, p = f"model.layers.{idx}.", (f"mtp_{k}",)
        maps += [
            TensorMap(p + ("enorm", "scale"), (d,), ((base + "enorm.weight", ()),), (d,)),
            TensorMap(p + ("hnorm", "scale"), (d,), ((base + "hnorm.weight", ()),), (d,)),
            TensorMap(p + ("eh_proj", "kernel"), (2 * d, d), ((base + "eh_proj.weight", ()),), (d, 2 * d), True),
            TensorMap(p + ("shared_head_norm", "scale"), (d,), ((base + "shared_head.norm.weight", ()),), (d,)),
        ]
        maps += _block_maps(c, p + ("block",), [idx], c.n_routed_experts > 0, stacked=False)
    return maps


def optional_hf_keys(config: ModelConfig) -> set[str]:
    """Keys a checkpoint may carry that we do not load: the MTP layers' copies of embedding and head, and a
    tied model's copy of its embedding as ``lm_head.weight``."""
    keys = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for k in range(config.num_nextn_predict_layers):
        base = f"model.layers.{config.num_hidden_layers + k}."
        keys |= {base + "embed_tokens.weight", base + "shared_head.head.weight"}
    return keys


# ----- reading HF directories ---------------------------------------------------------------------
def dequantize_fp8_blocks(w8: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK, *,
                          origin: tuple[int, int] = (0, 0), full_shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """``W[i, j] = W8[i, j] * scale_inv[i // block, j // block]`` in fp32; edge blocks may be partial.

    ``w8`` may be the region of a weight of ``full_shape`` that starts at row, column ``origin`` (the region
    one device's shard needs); ``scale_inv`` is always the whole weight's block grid."""
    rows, cols = w8.shape
    full = tuple(full_shape) if full_shape is not None else (rows, cols)
    expected = (math.ceil(full[0] / block), math.ceil(full[1] / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {full}: "
                         f"expected {expected} for {block}x{block} blocks")
    r0, c0 = origin
    s = np.asarray(scale_inv[r0 // block: (r0 + rows - 1) // block + 1, c0 // block: (c0 + cols - 1) // block + 1],
                   np.float32)
    scale = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[r0 % block: r0 % block + rows,
                                                                  c0 % block: c0 % block + cols]
    return w8.astype(np.float32) * scale


def open_indexed_files(index: str, opener) -> tuple[dict, dict[str, str]]:
    """Open every file an index (``{"weight_map": {tensor: file}}``) names, with ``opener(path)``; fail on a
    bad index, a named file that does not exist, or a tensor missing from the file the index names.
    Returns ``({file: opened}, weight_map)``."""
    directory, name = os.path.dirname(index), os.path.basename(index)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index ({e!r})") from None
    files = {}
    for fname in sorted(set(weight_map.values())):
        fpath = os.path.join(directory, fname)
        if not os.path.exists(fpath):
            names = [k for k, v in weight_map.items() if v == fname]
            raise CheckpointError(f"{index}: names file '{fname}' (for '{names[0]}' and {len(names) - 1} "
                                  f"more) which does not exist")
        files[fname] = opener(fpath)
    for key, fname in weight_map.items():
        if key not in files[fname]:
            raise CheckpointError(f"{os.path.join(directory, fname)}: tensor '{key}' is listed in {name} "
                                  f"but not in the file")
    return files, weight_map


class HFCheckpoint:
    """The tensors of an HF-format directory (sharded with an index, or one ``model.safetensors``).

    FP8 weights with a ``<name>_scale_inv`` sibling are dequantized on read; the scales are not listed as
    tensors of their own.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index):
            self._files, weight_map = open_indexed_files(index, SafetensorsFile)
            self._where = dict(weight_map)
        elif os.path.exists(single):
            self._files[SINGLE_FILE] = SafetensorsFile(single)
            self._where = {k: SINGLE_FILE for k in self._files[SINGLE_FILE].keys()}
        else:
            raise CheckpointError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE} found")
        self._scales = {k[: -len("_scale_inv")]: k for k in self._where if k.endswith("_scale_inv")}
        self.keys = [k for k in self._where if not k.endswith("_scale_inv")]

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, self._where[key])

    def release(self) -> None:
        """Unmap the files, so pages read so far stop counting toward RSS; they map again on the next read
        (the streaming converter calls this after every tensor)."""
        for f in self._files.values():
            f.close()

    def is_fp8(self, key: str) -> bool:
        return key in self._scales

    def raw(self, key: str) -> np.ndarray:
        """The stored array (memory-mapped), without dequantization."""
        return self._files[self._where[key]].get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._files[self._where[key]].dtype(key)

    def nbytes(self, key: str) -> int:
        n = self._files[self._where[key]].nbytes(key)
        if key in self._scales:
            n += self._files[self._where[self._scales[key]]].nbytes(self._scales[key])
        return n

    def read(self, key: str, rows: Optional[tuple[int, int]] = None,
             cols: Optional[tuple[int, int]] = None) -> np.ndarray:
        """The tensor, or its rows ``[r0, r1)`` (and columns ``[c0, c1)``), as a float array: fp8 blocks
        dequantized to fp32, other dtypes as stored."""
        raw = self.raw(key)
        x = raw
        if rows is not None:
            x = np.asarray(raw[rows[0]:rows[1]] if cols is None else raw[rows[0]:rows[1], cols[0]:cols[1]])
        if key in self._scales:
            try:
                return dequantize_fp8_blocks(x, self.raw(self._scales[key]),
                                             origin=(rows[0] if rows else 0, cols[0] if cols else 0),
                                             full_shape=tuple(raw.shape))
            except ValueError as e:
                raise CheckpointError(f"{self.file_of(key)}: tensor '{key}': {e}") from None
        return x


def _target_dtype(tm: TensorMap, source_dtype: np.dtype, dtype: Optional[np.dtype]) -> np.dtype:
    if tm.keep_fp32:
        return np.dtype(np.float32)
    if dtype is not None:
        return np.dtype(dtype)
    if source_dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        return source_dtype
    return np.dtype(ml_dtypes.bfloat16)  # fp8 sources: dequantized to bf16 unless asked otherwise


def check_keys(ckpt: HFCheckpoint, config: ModelConfig, maps: list[TensorMap]) -> None:
    """Fail on a missing or an extra tensor, naming it (and its file)."""
    wanted = {k for tm in maps for k, _ in tm.sources}
    have = set(ckpt.keys)
    missing = sorted(wanted - have)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: tensor '{missing[0]}'{more} missing from the checkpoint")
    extra = sorted(have - wanted - optional_hf_keys(config))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor '{extra[0]}'{more} (not part of a "
                              f"{config.model_type} model with this config.json)")


def drop_absent_mtp(ckpt: HFCheckpoint, config: ModelConfig) -> ModelConfig:
    """A checkpoint with no MTP tensors at all (transformers' ``save_pretrained`` writes none) loads as the
    main model only, with ``num_nextn_predict_layers = 0``; a partial MTP layer is still an error."""
    if config.num_nextn_predict_layers == 0:
        return config
    prefix = f"model.layers.{config.num_hidden_layers}."
    if any(k.startswith(prefix) for k in ckpt.keys):
        return config
    warnings.warn(f"{ckpt.path}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                  f"checkpoint has no '{prefix}*' tensors; loading the main model only")
    return config.replace(num_nextn_predict_layers=0)


def iter_leaves(ckpt: HFCheckpoint, config: ModelConfig, maps: list[TensorMap], dtype=None,
                check_finite: bool = True) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """Yield ``(map, array)`` per leaf, filled one source tensor at a time (peak = one leaf + one source)."""
    for tm in maps:
        first = tm.sources[0][0]
        out = None
        for key, index in tm.sources:
            src = ckpt.read(key)
            if tuple(src.shape) != tuple(tm.hf_shape):
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has shape {list(src.shape)}, "
                                      f"expected {list(tm.hf_shape)} from config.json")
            if not np.issubdtype(src.dtype, np.floating) and src.dtype.kind != "V" and \
                    src.dtype not in (np.dtype(ml_dtypes.bfloat16),):
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' has dtype {src.dtype}, expected a "
                                      f"floating-point type")
            if check_finite and not np.isfinite(src.astype(np.float32) if src.dtype.itemsize < 4 else src).all():
                raise CheckpointError(f"{ckpt.file_of(key)}: tensor '{key}' contains NaN or Inf")
            if out is None:
                out = np.empty(tm.shape, _target_dtype(tm, ckpt.dtype(first), dtype))
            out[index] = tm.to_ours(np.asarray(src)).astype(out.dtype)
        yield tm, out


def set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def pretrained_config(path: str | os.PathLike) -> ModelConfig:
    """The config ``load_pretrained(path)`` returns, without reading any weight (for an HF directory with no MTP
    tensors: ``num_nextn_predict_layers = 0``, see ``drop_absent_mtp``)."""
    path = os.fspath(path)
    from .convert.load import is_converted_dir
    from .train import is_train_workdir

    config = ModelConfig.from_pretrained(path)
    if is_converted_dir(path) or is_train_workdir(path):
        return config
    return drop_absent_mtp(HFCheckpoint(path), config)


def load_pretrained(path: str | os.PathLike, dtype=None, mesh=None, shardings=None):
    """``(config, params)`` from an HF-format directory (``config.json`` + safetensors, sharded or not) or
    a directory written by ``deepseek-jax convert`` (Orbax), or a ``deepseek-jax train`` work directory (its latest
    checkpoint).

    dtype: dtype of the returned params (default: as stored; FP8 weights are dequantized to bfloat16).
    The router's ``e_score_correction_bias`` is always fp32. ``dtype="fp8"``: weights stored in FP8 (an FP8 HF
    release, or a ``convert --keep-fp8`` directory) stay FP8 on the devices, as ``fp8_weights.Fp8Weight`` (e4m3
    values + 128x128 block scales, dequantized where a matmul reads them); the other params as stored.
    mesh / shardings: load straight onto a ``jax.sharding.Mesh``, each process reading only its own devices'
    shards (the byte ranges of the HF tensors they hold, FP8 blocks dequantized per shard; an Orbax directory's
    chunks); ``shardings`` (a params-shaped tree of ``Sharding``) overrides the default mapping of logical axes
    onto the mesh axes. Without either the params land on the default device, read the same way; no full
    layer-stacked array is ever assembled in host memory.
    """
    import jax
    import jax.numpy as jnp

    path = os.fspath(path)
    from .convert.load import is_converted_dir, load_converted  # lazy: keeps orbax off the HF path

    if is_converted_dir(path):
        return load_converted(path, dtype=dtype, mesh=mesh, shardings=shardings)
    from .train import is_train_workdir, load_train_checkpoint

    if is_train_workdir(path) and isinstance(dtype, str) and dtype == "fp8":
        raise ValueError(f"{path}: a train work directory holds no FP8 weights to keep (dtype='fp8' keeps the FP8 "
                         f"weights of an FP8 release or a `convert --keep-fp8` directory)")
    if is_train_workdir(path) and mesh is None and shardings is None:
        config, params = load_train_checkpoint(path)
        if dtype is not None:  # the router's correction bias stays fp32
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: x if str(getattr(p[-1], "key", "")) == "e_score_correction_bias" else x.astype(dtype),
                params)
        return config, params
    if is_train_workdir(path):
        raise ValueError(f"{path}: a train work directory loads onto one device; place the params with "
                         f"jax.device_put, or export it first")
    config = ModelConfig.from_pretrained(path)
    ckpt = HFCheckpoint(path)
    config = drop_absent_mtp(ckpt, config)
    maps = hf_tensor_map(config)
    check_keys(ckpt, config, maps)
    if shardings is None:
        from .model import Transformer
        from .sharding import make_mesh, param_shardings

        mesh = mesh if mesh is not None else make_mesh(None, jax.devices()[:1])
        boxed = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
        shardings = param_shardings(boxed["params"], mesh)
    from .sharded_load import load_sharded

    stacked = {name for name, _, _ in config.layer_runs}
    return config, load_sharded(ckpt, maps, shardings, stacked, dtype)
