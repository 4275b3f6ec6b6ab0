"""Manifold-constrained hyper-connections (DeepSeek-V4's residual, docs/reference.md): the residual is N streams
``[B, T, N, D]``; each block reads a weighted sum of them and writes back through a doubly-stochastic mix.

For one block, from the streams ``h`` (fp32 math, as the reference keeps these modules in fp32):
  ``m = rmsnorm(flatten(h)) @ fn.T + ...`` split into pre ``[N]``, post ``[N]``, comb ``[N, N]``;
  ``pre = sigmoid(m_pre * s0 + b_pre) + eps``, ``post = 2 sigmoid(m_post * s1 + b_post)``,
  ``comb = Sinkhorn(softmax(m_comb * s2 + b_comb) + eps)`` (columns first, then ``iters - 1`` rounds of rows
  and columns, each divided by its sum + eps);
  the block's input is ``sum_n pre_n h_n``; its output ``y`` gives ``h'_k = post_k y + sum_j comb_jk h_j``.
The head collapses the streams once more (``HyperHead``: ``pre`` only) before the final norm.

Parameters keep transformers' layouts: ``fn [(2 + N) N, N D]``, ``base [(2 + N) N]``, ``scale [3]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _mixes(h: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """``rmsnorm(flatten(h)) @ fn.T`` in fp32 (the norm has no scale): ``[B, T, rows of fn]``."""
    flat = h.reshape(*h.shape[:-2], -1).astype(jnp.float32)
    flat = flat * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return jnp.einsum("...f,rf->...r", flat, fn.astype(jnp.float32), precision=HIGHEST)


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
    """The reference's Sinkhorn-Knopp projection of positive ``[..., N, N]`` toward doubly stochastic."""
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return comb


def collapse(h: jax.Array, pre: jax.Array) -> jax.Array:
    """``sum_n pre_n h_n``: ``[B, T, N, D]`` -> ``[B, T, D]`` in h's dtype."""
    return (pre[..., None] * h.astype(jnp.float32)).sum(-2).astype(h.dtype)


def expand(h: jax.Array, y: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """The streams after a block: ``h'_k = post_k y + sum_j comb_jk h_j`` in h's dtype."""
    dt = h.dtype
    mixed = jnp.einsum("...jk,...jd->...kd", comb.astype(dt), h, precision=HIGHEST if dt == jnp.float32 else None)
    return post.astype(dt)[..., None] * y.astype(dt)[..., None, :] + mixed


class HyperConnection(nn.Module):
    """Returns ``(post [B,T,N], comb [B,T,N,N], block input [B,T,D])`` for streams ``h [B,T,N,D]``."""

    hc_mult: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    init_std: float = 0.02

    @nn.compact
    def __call__(self, h: jax.Array):
        n, width = self.hc_mult, h.shape[-1] * self.hc_mult
        rows = (2 + n) * n
        fn = self.param("fn", nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (None, "embed")),
                        (rows, width), jnp.float32)
        base = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (rows,), jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (3,), jnp.float32)
        m = _mixes(h, fn, self.norm_eps)
        pre = jax.nn.sigmoid(m[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2 * jax.nn.sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n])
        logits = m[..., 2 * n:].reshape(*m.shape[:-1], n, n) * scale[2] + base[2 * n:].reshape(n, n)
        comb = sinkhorn(jax.nn.softmax(logits, axis=-1) + self.hc_eps, self.sinkhorn_iters, self.hc_eps)
        return post, comb, collapse(h, pre)


class HyperHead(nn.Module):
    """The final collapse of the streams ``[B,T,N,D]`` -> ``[B,T,D]`` (``hc_fn [N, N D]``, ``hc_base [N]``,
    ``hc_scale [1]``)."""

    hc_mult: int
    hc_eps: float
    norm_eps: float
    init_std: float = 0.02

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        n = self.hc_mult
        fn = self.param("hc_fn", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                              (None, "embed")), (n, n * h.shape[-1]), jnp.float32)
        base = self.param("hc_base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (n,), jnp.float32)
        scale = self.param("hc_scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,),
                           jnp.float32)
        pre = jax.nn.sigmoid(_mixes(h, fn, self.norm_eps) * scale[0] + base) + self.hc_eps
        return collapse(h, pre)
