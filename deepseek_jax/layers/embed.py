"""The token embedding and its lookup (``Embed.attend``: the tied output head of the dense students)."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import LogitsRecipe
from deepseek_jax.parallel.mesh import current_mesh
from deepseek_jax.parallel.rules import BATCH_AXES, constrain, largest_dividing


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def embedding_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """``table[tokens]`` in ``dtype``. The rows are read from the table cast to ``dtype`` (under FSDP the table's
    gather moves 16-bit values, not the fp32 master copy); the gradient is the same as a lookup of the fp32
    table cast afterwards: the cotangents scatter-added in fp32.

    On a mesh of batch axes alone both run split over the model dim (``_model_dim_axes``): the table's rows are
    split over the vocabulary by the FSDP rules and the tokens over the batch, and a gather (or scatter) between
    those two layouts makes XLA replicate one of them whole (the whole global batch's cotangents in fp32,
    ``[B, T, D]`` on every device, or the whole table). Split over D instead, each device looks up (adds) its
    columns for every token: the table and the cotangents each move once by an all-to-all, and nothing is
    replicated but the token ids."""
    return _lookup(table.astype(dtype), tokens)


def _model_dim_axes(d: int):
    """The mesh axes (those of the batch whose product divides ``d``) that the lookup splits the model dim over,
    or None outside a mesh and on meshes with any other axis (context, tensor) larger than 1. There the move from
    a model-dim split to the activations' layout is not one all-to-all between two dims: with context
    parallelism XLA all-gathered the whole batch's rows instead (TPU compiler, V3 at 32k tokens), and with
    ``tensor=2`` the train step of a 1.5B student needed 2.60 GB of temporaries per device against 1.56 (XLA:CPU,
    8 devices); the plain lookup is kept there."""
    mesh = current_mesh()
    if mesh is None or getattr(mesh, "manual_axes", ()):
        return None
    if any(size > 1 and a not in BATCH_AXES for a, size in mesh.shape.items()):
        return None
    axes = largest_dividing(tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1), d, mesh)
    return axes or None


def _split_d(x: jax.Array, axes) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*([None] * (x.ndim - 1)), axes))


def _lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    axes = _model_dim_axes(table.shape[1])
    if axes is None:
        return jnp.take(table, tokens, axis=0)
    ids = jax.lax.with_sharding_constraint(tokens, PartitionSpec())
    out = _split_d(jnp.take(_split_d(table, axes), ids, axis=0), axes)
    # Straight to the activations' layout (one all-to-all), before anything else reads the rows.
    return constrain(out, ("act_batch", "act_length", "act_embed")) if out.ndim == 3 else out


def _lookup_fwd(table, tokens, dtype):
    return embedding_lookup(table, tokens, dtype), (table, tokens)


def _lookup_bwd(dtype, res, g):
    table, tokens = res
    axes = _model_dim_axes(table.shape[1])
    g = g.astype(jnp.float32)
    if axes is None:
        grad = jnp.zeros(table.shape, jnp.float32).at[tokens].add(g)
    else:
        ids = jax.lax.with_sharding_constraint(tokens, PartitionSpec())
        grad = _split_d(_split_d(jnp.zeros(table.shape, jnp.float32), axes).at[ids].add(_split_d(g, axes)), axes)
    return grad.astype(table.dtype), None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embed(nn.Module):
    """The token embedding; ``attend(h)`` uses the same table as the output head (tied embeddings)."""

    vocab_size: int
    features: int
    options: ModelOptions
    init_std: float = 0.02

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.vocab_size, self.features),
            self.options.params_dtype,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return embedding_lookup(self.embedding, tokens, self.options.compute_dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Logits ``h [..., D] @ table.T`` in fp32, outside the matmul recipe (the output head stays in high
        precision)."""
        dims = (((h.ndim - 1,), (1,)), ((), ()))
        return LogitsRecipe(self.options.compute_dtype, self.options.target_platform()).dot_general(
            h, self.embedding, dims)
