"""FP8-kept weights: e4m3 values and their 128x128 block scales stay on the devices, as DeepSeek's FP8 releases
store them (about 1 byte per weight plus 4 bytes per 16,384), and are dequantized where a matmul reads them.

``Fp8Weight`` is a pytree (``q``, then ``scale``) that sits in the params tree in place of a linear's kernel. It
has the kernel's shape (Flax's shape check at ``apply`` compares ``q``), and every consumer of a kernel reads it
through ``astype`` (the matmul recipes, the MoE's compute-dtype copy of the expert stacks, MLA's absorbed decode
path) or indexing, both of which dequantize: ``W[i, j] = q[i, j] * scale[i // 128, j // 128]`` over the kernel's
2-D view ``[prod(in dims), prod(out dims)]`` (edge blocks partial), per layer inside the scanned stack, so the
dequantized copy of one layer's matrix is a temporary of the step that reads it. On TPU, a linear layer's
``x @ kernel`` instead runs ``quant/kernel.py``'s Pallas kernel, which dequantizes block by block inside the matmul
(``ModelOptions.fp8_weight_matmul``); ``quantize`` turns a kernel into an ``Fp8Weight`` as the releases do.

Layout: ``q`` is the kernel in our layout (``lead + in_dims + out_dims``, the transposed HF ``[out, in]``);
``scale`` is ``lead + [ceil(in / 128), ceil(out / 128)]`` fp32 (the HF ``weight_scale_inv``, transposed like the
weight). ``lead`` are the stacked layer / expert dims.

``Fp4Weight`` is the same for DeepSeek-V4's FP4 routed experts (``quant/fp4.py``): ``q`` holds the e2m1 codes as
``uint4`` in the kernel's shape (half a byte each where XLA packs 4-bit types, as on TPU), ``scale`` one per 32
inputs and output, ``lead + [in / 32, out]`` (bf16 for the release's e8m0 powers of two, exactly; else fp32);
``W[i, j] = e2m1(q[i, j]) * scale[i // 32, j]``.

Sharding (``block_aligned_specs``): shard boundaries fall on 128-block edges (FP4: on 32-input groups), so every
device holds whole blocks and their scales and dequantizes its own shard with no communication. ``q`` takes the
kernel's sharding where that splits the 2-D view into whole blocks; where a rule would split a block, that dim is
sharded over fewer ways (mesh axes dropped from the end of its rule) or not at all. ``scale`` is sharded exactly
as ``q``: the lead dims alike, the block-row / block-column dims over the axes of the first in / out dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from deepseek_jax.parallel.rules import entry_axes, spec_entry
from deepseek_jax.quant import fp4
from deepseek_jax.quant.blocks import BLOCK, dequantize_tiles, quantize_tiles


@jax.tree_util.register_pytree_node_class
class Fp8Weight:
    """A kept-FP8 kernel (see the module docstring). ``n_in`` / ``n_out``: how many trailing dims of ``q`` are
    the kernel's input and output dims."""

    BLOCKS = (BLOCK, BLOCK)  # the scale tile of the 2-D view: (inputs, outputs)
    Q_BITS = 8

    def __init__(self, q, scale, n_in: int, n_out: int):
        self.q, self.scale, self.n_in, self.n_out = q, scale, int(n_in), int(n_out)

    def tree_flatten(self):
        return (self.q, self.scale), (self.n_in, self.n_out)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return (int(math.prod(self.q.shape)) * self.Q_BITS // 8
                + int(math.prod(self.scale.shape)) * jnp.dtype(self.scale.dtype).itemsize)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        lead = self.ndim - self.n_in - self.n_out
        q2 = self.q.reshape(self.shape[:lead] + _matrix_view(self.shape[lead:], self.n_in))
        return dequantize_tiles(q2, self.scale, _block_tiles(lead), dtype).reshape(self.shape)

    def astype(self, dtype) -> jax.Array:
        return self.dequantize(dtype)

    def __getitem__(self, index):
        """Indexing only the stacked (lead) dims, e.g. an expert by id: the ``Fp8Weight`` of those entries (no
        dequantization; the grouped expert GEMMs pick experts this way). Any other index: dequantized values."""
        lead = self.ndim - self.n_in - self.n_out
        parts = index if isinstance(index, tuple) else (index,)
        if lead and len(parts) <= lead and not any(p is Ellipsis or p is None for p in parts):
            return type(self)(self.q[index], self.scale[index], self.n_in, self.n_out)
        return self.dequantize()[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, scale={tuple(self.scale.shape)}, n_in={self.n_in})"


@jax.tree_util.register_pytree_node_class
class Fp4Weight(Fp8Weight):
    """A kept-FP4 kernel (DeepSeek-V4's routed experts; see the module docstring)."""

    BLOCKS = (fp4.GROUP, 1)
    Q_BITS = 4

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        lead = self.ndim - self.n_in - self.n_out
        rows, cols = _matrix_view(self.shape[lead:], self.n_in)
        values = decode_e2m1(self.q).reshape(self.shape[:lead] + (rows // fp4.GROUP, fp4.GROUP, cols))
        return (values * self.scale.astype(jnp.float32)[..., :, None, :]).astype(dtype).reshape(self.shape)


def decode_e2m1(codes) -> jax.Array:
    """e2m1 codes (sign bit 3, exponent bits 2-1, mantissa bit 0) -> fp32 values, by arithmetic (no table)."""
    c = codes.astype(jnp.int32)
    e, m = (c >> 1) & 3, (c & 1).astype(jnp.float32)
    magnitude = jnp.where(e == 0, 0.5 * m, (2.0 + m) * jnp.exp2((e - 2).astype(jnp.float32)))
    return jnp.where(c >= 8, -magnitude, magnitude)


def _matrix_view(shape, n_in: int) -> tuple[int, int]:
    """``(prod(in dims), prod(out dims))``: the 2-D view of a kernel's own dims, whose blocks are quantized."""
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _block_tiles(lead: int) -> tuple[int, ...]:
    """Tiles of a stacked 2-D view: one entry of each lead dim by a 128x128 block."""
    return (1,) * lead + (BLOCK, BLOCK)


def quantize(kernel: jax.Array, n_in: int = 1, n_out: int = 1) -> Fp8Weight:
    """``kernel`` (``lead + in_dims + out_dims``) as an ``Fp8Weight``: per 128x128 block of its 2-D view, as
    DeepSeek's FP8 releases quantize their weights (``quant/blocks.py``)."""
    shape = tuple(kernel.shape)
    lead = len(shape) - n_in - n_out
    q, scale = quantize_tiles(kernel.reshape(shape[:lead] + _matrix_view(shape[lead:], n_in)), _block_tiles(lead))
    return Fp8Weight(q.reshape(shape), scale, n_in, n_out)


def block_aligned_specs(spec, shape, n_in: int, n_out: int, mesh_shape, blocks=(BLOCK, BLOCK)) -> tuple:
    """``(q_spec, scale_spec)`` (``PartitionSpec``s) for an FP8 kernel of ``shape`` (``lead + in + out`` dims)
    whose plain kernel would take ``spec`` on a mesh with axis sizes ``mesh_shape``: block edges respected (see
    the module docstring). Within the in (or out) dims only the first may be split (a split of a later one cuts
    the 2-D view into non-contiguous pieces); it keeps the longest prefix of its axes whose shards hold whole
    128-row (column) blocks (``blocks``: the scale tile, ``Fp4Weight.BLOCKS`` for FP4)."""
    from jax.sharding import PartitionSpec

    entries = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
    lead = len(shape) - n_in - n_out
    q, scale = entries[:lead], entries[:lead]
    for (start, n), block in zip(((lead, n_in), (lead + n_in, n_out)), blocks):
        dims = shape[start:start + n]
        axes = entry_axes(entries[start]) if n else ()
        inner = math.prod(dims[1:]) if n else 1
        while axes:
            ways = math.prod(mesh_shape[a] for a in axes)
            if dims[0] % ways == 0 and (dims[0] // ways * inner) % block == 0:
                break
            axes = axes[:-1]
        q += [spec_entry(axes)] + [None] * (n - 1)
        scale.append(spec_entry(axes))
    return PartitionSpec(*q), PartitionSpec(*scale)


def fp8_shardings(sharding, shape, n_in: int, n_out: int, blocks=(BLOCK, BLOCK)) -> tuple:
    """``(q_sharding, scale_sharding)`` for an FP8 kernel whose plain kernel takes ``sharding`` (a
    ``NamedSharding``; anything else, e.g. one device, is used for both as it is)."""
    from jax.sharding import NamedSharding

    if not isinstance(sharding, NamedSharding):
        return sharding, sharding
    q_spec, scale_spec = block_aligned_specs(sharding.spec, shape, n_in, n_out, sharding.mesh.shape, blocks)
    return NamedSharding(sharding.mesh, q_spec), NamedSharding(sharding.mesh, scale_spec)


def with_fp8_shardings(shardings, params):
    """``shardings`` (one per kernel, from ``parallel/rules.py``'s ``param_shardings``) for a params tree that may hold
    ``Fp8Weight``s: each one's ``q`` and ``scale`` sharded on block edges (``fp8_shardings``)."""

    def one(sharding, p):
        if isinstance(p, Fp8Weight):
            return type(p)(*fp8_shardings(sharding, p.shape, p.n_in, p.n_out, p.BLOCKS), p.n_in, p.n_out)
        return sharding

    return jax.tree.map(one, shardings, params, is_leaf=lambda x: isinstance(x, Fp8Weight))
