"""Inference capacity, worked out by hand (no compile, no device): the bytes of the weights and of the latent cache
on each device of a mesh, and the largest batch x context that fits a chip's memory.

Weights: every leaf of the params tree (MTP modules included, as prefill and decode hold them) sharded by the logical
rules of ``parallel/rules.py`` onto the mesh's axis sizes; the bytes of one device's shard, summed. With
``weight_dtype="fp8"`` the linears DeepSeek's FP8 release quantizes (``checkpoint/convert/export.py``'s
``release_quantized``) count 1 byte per weight plus one fp32 scale per 128x128 block of each source matrix, both
sharded on block edges (``quant/weights.py``'s ``block_aligned_specs``, as ``load_pretrained(..., dtype="fp8")``
places them); everything else (embedding, head, router, norms) stays bf16.

Cache (``layers/kv_cache.py``): per token and layer ``kv_lora_rank + qk_rope_head_dim`` values (c_kv and k_pe) at the
cache dtype (fp8: 1 byte each plus two fp32 scales); V3 in bf16 is ``(512 + 64) x 2 x 61 = 70,272`` bytes per
token. The cache splits its batch over ``data x fsdp x expert`` (``kv_cache.cache_shardings``) and keeps every
slot of a sequence on one device (replicated over ``context`` and ``tensor``), so one device holds
``batch / (data x fsdp x expert)`` whole sequences.

Fits: ``weights + sequences_per_device x context x cache_bytes_per_token <= (1 - reserve) x device memory``;
``reserve`` holds back room for the step's temporaries and code, which only compiling the step measures (the
decode / prefill steps of ``deepseek-jax plan``). Prefill holds the same weights and writes the same cache as
decode; its activations (one layer at a time) are among those temporaries. The default reserve, 15%, is what the
TPU compiler measured for V3's decode step on v5p:4x4x4 (``fsdp=4,expert=16``, 32k context: temporaries 14-15 GB
of 102.8); with it the hand figure (1,792 sequences) equals the largest batch that compiles (bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

from deepseek_jax.config.model import FP32_LEAVES, ModelConfig
from deepseek_jax.layers.kv_cache import cache_bytes_per_token, v4_cache_bytes
from deepseek_jax.parallel.rules import entry_axes
from deepseek_jax.quant import fp4
from deepseek_jax.quant.blocks import block_grid

# HBM per chip as the TPU compiler reports it available (v5p: measured, bench/RESULTS.md) or the data sheet's.
CHIP_MEMORY = {
    "v5p": int(95.74 * 2**30),
    "v5e": 16 * 2**30, "v5litepod": 16 * 2**30,
    "v4": 32 * 2**30,
    "v6e": 32 * 2**30,
}
DEFAULT_CONTEXTS = (4096, 8192, 32768, 131072)
DEFAULT_RESERVE = 0.15


class _MeshShape:
    """What the sharding rules read of a mesh: its axis sizes."""

    def __init__(self, sizes: dict[str, int]):
        self.shape = dict(sizes)


def topology_chips(topology: str) -> tuple[str, int]:
    """``"v5p:4x4x4"`` -> ``("v5p", 64)``: the chip generation and the number of chips (the product of the dims)."""
    m = re.fullmatch(r"\s*([a-z0-9]+)[:-](\d+(?:x\d+)*)\s*", topology.lower())
    if not m:
        raise ValueError(f"topology {topology!r}: expected a name like v5p:4x4x4")
    return m.group(1), math.prod(int(d) for d in m.group(2).split("x"))


def chip_memory(generation: str) -> Optional[int]:
    return CHIP_MEMORY.get(generation)


def _shard_size(shape: Sequence[int], spec, sizes: dict[str, int]) -> int:
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))):
        ways = math.prod(sizes[a] for a in entry_axes(axes))
        n *= -(-dim // ways)
    return n


def fp8_kept_kernels(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, int, tuple[int, ...], type]]:
    """The kernels DeepSeek's FP8 release quantizes (``release_quantized``), as
    ``load_pretrained(..., dtype="fp8")`` keeps them: params path -> ``(n_in, n_out, scale shape, class)``, the class
    ``Fp8Weight``, or ``Fp4Weight`` for V4's routed experts (its release stores them in FP4)."""
    from deepseek_jax.checkpoint.convert.export import release_quantized
    from deepseek_jax.checkpoint.hf_map import hf_tensor_map, split_point
    from deepseek_jax.quant.weights import Fp4Weight, Fp8Weight

    out = {}
    for tm in hf_tensor_map(config):
        if release_quantized(tm.path, tm.transpose):
            n_in = split_point(tm)
            lead = tm.shape[:len(tm.sources[0][1])]
            if config.is_v4 and tm.path[-2] == "experts":
                out[tm.path] = (n_in, len(tm.item_shape) - n_in, lead + fp4.scale_shape(tm.hf_shape)[::-1], Fp4Weight)
            else:
                out[tm.path] = (n_in, len(tm.item_shape) - n_in, lead + block_grid(tm.hf_shape[::-1]), Fp8Weight)
    return out


def weight_bytes(config: ModelConfig, mesh_sizes: dict[str, int], weight_dtype: str = "bfloat16",
                 fsdp_over_data: bool = False) -> tuple[int, int]:
    """``(total, per_device)`` bytes of the params at ``weight_dtype`` ("float32", "bfloat16" or "fp8") sharded by
    the logical rules onto a mesh of ``mesh_sizes`` (the largest device's shard; shards are equal when dims
    divide)."""
    import flax.linen as nn
    import jax
    from jax.sharding import PartitionSpec

    from deepseek_jax.models.transformer import abstract_params
    from deepseek_jax.parallel.mesh import MESH_AXES
    from deepseek_jax.parallel.rules import logical_rules, mesh_axes_for
    from deepseek_jax.quant.weights import block_aligned_specs

    sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    boxed = abstract_params(config)
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    rules = logical_rules(fsdp_over_data)
    mesh = _MeshShape(sizes)
    quantized = fp8_kept_kernels(config) if weight_dtype == "fp8" else {}
    plain = {"float32": 4, "bfloat16": 2, "fp8": 2}[weight_dtype]
    total = per_device = 0
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)))
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        spec = mesh_axes_for(tuple(flat_specs[path]), x.shape, mesh, rules)
        n, local = math.prod(x.shape), _shard_size(x.shape, spec, sizes)
        if key[-1] in FP32_LEAVES:  # always fp32
            total, per_device = total + 4 * n, per_device + 4 * local
        elif key in quantized:  # e4m3 weights and fp32 scales (FP4: half a byte, bf16), on block edges
            n_in, n_out, grid, cls = quantized[key]
            q_spec, scale_spec = block_aligned_specs(spec, x.shape, n_in, n_out, sizes, cls.BLOCKS)
            q_bytes, scale_bytes = (0.5, 2) if cls.Q_BITS == 4 else (1, 4)
            total += int(q_bytes * n) + scale_bytes * math.prod(grid)
            per_device += int(q_bytes * _shard_size(x.shape, q_spec, sizes)) + scale_bytes * _shard_size(
                grid, scale_spec, sizes)
        else:
            total, per_device = total + plain * n, per_device + plain * local
    return total, per_device


@dataclasses.dataclass
class InferenceCapacity:
    """Per device bytes and what fits; ``max_batch[context]`` is the largest global batch of sequences of that
    many tokens (prompt + generated) whose cache fits beside the weights (0: not even the weights fit)."""

    devices: int
    mesh: dict[str, int]
    device_memory: int
    reserve: float
    weight_dtype: str
    cache_dtype: str
    weight_bytes_total: int
    weight_bytes_per_device: int
    cache_bytes_per_token: int
    batch_ways: int  # sequences are split over this many devices (data x fsdp x expert)
    max_batch: dict[int, int]
    # One sequence's cache by context where it is not linear in the context (V4: a window ring, pooled entries
    # and fixed compressor states; ``cache_bytes_per_token`` is then the longest context's average).
    sequence_bytes: Optional[dict[int, int]] = None

    def cache_bytes_per_sequence(self, context: int) -> int:
        if self.sequence_bytes is not None and context in self.sequence_bytes:
            return self.sequence_bytes[context]
        return context * self.cache_bytes_per_token

    @property
    def free_bytes_per_device(self) -> int:
        return int(self.device_memory * (1 - self.reserve)) - self.weight_bytes_per_device

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["max_batch"] = {str(k): v for k, v in self.max_batch.items()}
        d["cache_bytes_per_sequence"] = {str(c): self.cache_bytes_per_sequence(c) for c in self.max_batch}
        d["free_bytes_per_device"] = self.free_bytes_per_device
        return d

    def table(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "one device"
        lines = [
            f"inference capacity (by hand: weights + latent cache; {self.reserve:.0%} of memory kept for "
            f"temporaries) on {self.devices} devices, mesh {mesh}, {gb(self.device_memory)} each",
            f"  weights ({self.weight_dtype})   {gb(self.weight_bytes_total)} in all, "
            f"{gb(self.weight_bytes_per_device)} per device",
            (f"  latent cache ({self.cache_dtype})   {self.cache_bytes_per_token:,} bytes per token (all layers); "
             if self.sequence_bytes is None else
             f"  compressed cache ({self.cache_dtype}; window ring, pooled entries, fp32 compressor states)   "
             f"{self.cache_bytes_per_token:,} bytes per token at {max(self.sequence_bytes):,}; ") +
            f"sequences split {self.batch_ways} ways",
            "  context    cache per sequence    largest global batch (decode)",
        ]
        for c, b in self.max_batch.items():
            lines.append(f"  {c:>7,}    {gb(self.cache_bytes_per_sequence(c)):>18}    {b:>10,}")
        return "\n".join(lines)


def inference_capacity(config: ModelConfig, mesh_sizes: dict[str, int], device_memory: int, *,
                       weight_dtype: str = "bfloat16", cache_dtype: str = "bfloat16", reserve: float = DEFAULT_RESERVE,
                       contexts: Sequence[int] = DEFAULT_CONTEXTS, fsdp_over_data: bool = False) -> InferenceCapacity:
    """Weights and cache per device on a mesh of ``mesh_sizes`` with ``device_memory`` bytes per device, and the
    largest batch for each context length (see the module docstring for the formula)."""
    from deepseek_jax.parallel.mesh import MESH_AXES
    from deepseek_jax.parallel.rules import BATCH_AXES

    if not 0 <= reserve < 1:
        raise ValueError(f"reserve={reserve}: expected a fraction in [0, 1)")
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    total, local = weight_bytes(config, sizes, weight_dtype, fsdp_over_data)
    if config.is_v4:
        sequence = {int(c): sum(v4_cache_bytes(config, int(c), cache_dtype).values()) for c in contexts}
        per_token = sequence[max(sequence)] // max(sequence)
    else:
        per_token = cache_bytes_per_token(config, cache_dtype)
        sequence = None
    ways = math.prod(sizes[a] for a in BATCH_AXES)
    free = int(device_memory * (1 - reserve)) - local
    max_batch = {int(c): (max(free, 0) // (sequence[int(c)] if sequence else int(c) * per_token)) * ways
                 for c in contexts}
    return InferenceCapacity(devices=math.prod(sizes.values()), mesh=sizes, device_memory=int(device_memory),
                             reserve=reserve, weight_dtype=weight_dtype, cache_dtype=cache_dtype,
                             weight_bytes_total=total, weight_bytes_per_device=local, cache_bytes_per_token=per_token,
                             batch_ways=ways, max_batch=max_batch, sequence_bytes=sequence)
