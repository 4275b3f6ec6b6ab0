"""The naive attention core: the whole ``[T, S]`` score matrix in fp32, softmax, values. The reference the other
cores are tested against, and the core for short rows (one block).

Shapes: B batch, T queries, S keys, H query heads, Hk key/value heads (H for the full MLA path; 1 for the
absorbed path, whose single "head" is the shared latent; a divisor of H for GQA), Dk q/k head dim, Dv value
head dim. q ``[B,T,H,Dk]``, k ``[B,S,Hk,Dk]``, v ``[B,S,Hk,Dv]`` -> ``[B,T,H,Dv]``. A query that sees no key
(padding) gives 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.layers.attention.layout import Layout, visible

MASKED = -1e30  # a masked score: finite, so a fully masked block gives exp(0) = 1 that the mask then zeroes


def group_heads(q: jax.Array, hk: int) -> jax.Array:
    """``[B,T,H,D]`` -> ``[B,T,Hk,G,D]``: query heads grouped by the key head they share."""
    b, t, h, d = q.shape
    return q.reshape(b, t, hk, h // hk, d)


def _qk(q, k):
    """Scores ``[B,H,T,S]`` (fp32) of q ``[B,T,H,D]`` against k ``[B,S,Hk,D]``: as plain per-head (Hk = H) or
    shared-head (Hk = 1) einsums where they apply (XLA:CPU runs them faster than the grouped form)."""
    b, t, h, _ = q.shape
    hk = k.shape[2]
    if hk == h:
        return jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if hk == 1:
        return jnp.einsum("bthd,bsd->bhts", q, k[:, :, 0], preferred_element_type=jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", group_heads(q, hk), k, preferred_element_type=jnp.float32)
    return s.reshape(b, h, t, k.shape[1])


def _pv(p, v):
    """``p [B,H,T,S]`` times v ``[B,S,Hk,D]`` -> ``[B,T,H,D]`` (fp32)."""
    b, h, t, s = p.shape
    hk = v.shape[2]
    if hk == h:
        return jnp.einsum("bhts,bshd->bthd", p, v, preferred_element_type=jnp.float32)
    if hk == 1:
        return jnp.einsum("bhts,bsd->bthd", p, v[:, :, 0], preferred_element_type=jnp.float32)
    o = jnp.einsum("bkgts,bskd->btkgd", p.reshape(b, hk, h // hk, t, s), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, v.shape[-1])


def naive_attention(q, k, v, layout: Layout, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with fp32 scores and softmax over the whole ``[T, S]``: the reference."""
    mask = visible(layout)[:, None]
    scores = jnp.where(mask, _qk(q, k) * scale, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)  # a row that sees nothing gives 0
    return _pv(probs, v).astype(v.dtype)


