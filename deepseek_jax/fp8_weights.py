"""FP8-kept weights: e4m3 values and their 128x128 block scales stay on the devices, as DeepSeek's FP8 releases
store them (about 1 byte per weight plus 4 bytes per 16,384), and are dequantized where a matmul reads them.

``Fp8Weight`` is a pytree (``q``, then ``scale``) that sits in the params tree in place of a linear's kernel. It
has the kernel's shape (Flax's shape check at ``apply`` compares ``q``), and every consumer of a kernel reads it
through ``astype`` (the matmul recipes, the MoE's compute-dtype copy of the expert stacks, MLA's absorbed decode
path) or indexing, both of which dequantize: ``W[i, j] = q[i, j] * scale[i // 128, j // 128]`` over the kernel's
2-D view ``[prod(in dims), prod(out dims)]`` (edge blocks partial), per layer inside the scanned stack, so the
dequantized copy of one layer's matrix is a temporary of the step that reads it.

Layout: ``q`` is the kernel in our layout (``lead + in_dims + out_dims``, the transposed HF ``[out, in]``);
``scale`` is ``lead + [ceil(in / 128), ceil(out / 128)]`` fp32 (the HF ``weight_scale_inv``, transposed like the
weight). ``lead`` are the stacked layer / expert dims.

Sharding: ``q`` takes the kernel's sharding; ``scale`` is replicated (small). Dequantization is an elementwise
product of ``q`` with the expanded scale, which XLA computes shard by shard whatever the shard boundaries, so they
need not fall on block edges.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLOCK = 128


@jax.tree_util.register_pytree_node_class
class Fp8Weight:
    """A kept-FP8 kernel (see the module docstring). ``n_in`` / ``n_out``: how many trailing dims of ``q`` are
    the kernel's input and output dims."""

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
        return int(math.prod(self.q.shape)) * 1 + int(math.prod(self.scale.shape)) * 4

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        shape = self.shape
        k = self.n_in + self.n_out
        lead = shape[: len(shape) - k]
        rows = math.prod(shape[len(lead): len(lead) + self.n_in])
        cols = math.prod(shape[len(lead) + self.n_in:])
        q = self.q.reshape(lead + (rows, cols)).astype(jnp.float32)
        s = jnp.repeat(jnp.repeat(self.scale.astype(jnp.float32), BLOCK, axis=-2), BLOCK, axis=-1)
        return (q * s[..., :rows, :cols]).astype(dtype).reshape(shape)

    def astype(self, dtype) -> jax.Array:
        return self.dequantize(dtype)

    def __getitem__(self, index) -> jax.Array:
        return self.dequantize()[index]

    def __repr__(self) -> str:
        return f"Fp8Weight(shape={self.shape}, scale={tuple(self.scale.shape)}, n_in={self.n_in})"



def with_fp8_shardings(shardings, params):
    """``shardings`` (one per kernel, from ``sharding.param_shardings``) for a params tree that may hold
    ``Fp8Weight``s: each one's ``q`` takes its kernel's sharding, its ``scale`` is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    def one(sharding, p):
        if isinstance(p, Fp8Weight):
            rep = NamedSharding(sharding.mesh, PartitionSpec()) if hasattr(sharding, "mesh") else sharding
            return Fp8Weight(sharding, rep, p.n_in, p.n_out)
        return sharding

    return jax.tree.map(one, shardings, params, is_leaf=lambda x: isinstance(x, Fp8Weight))
