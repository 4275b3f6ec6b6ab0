"""DeepSeek-V3.2's lightning indexer: the small projections that score past tokens for sparse attention
(``layers/attention/sparse.py`` selects and attends).

Weights, as the reference names them under ``self_attn.indexer``: ``wq_b`` reads the query LoRA latent
(``q_a_layernorm``'s output), ``wk`` the hidden state then ``k_norm`` (a LayerNorm with bias, eps 1e-6),
``weights_proj`` the hidden state (one weight per indexer head, in fp32). RoPE turns the first ``rope_dim`` dims
of each query head and of the key, with the halves paired (not interleaved, unlike MLA's own rope).

Shapes: B batch, T tokens, D model width, L q_lora_rank, Hi indexer heads, Di indexer head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.linear import Linear, MatmulRecipe
from deepseek_jax.layers.rope import apply_rope
from deepseek_jax.ops import contract_last

INDEX_NORM_EPS = 1e-6


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = INDEX_NORM_EPS) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last dim (biased variance), fp32 statistics."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    out = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


class Indexer(nn.Module):
    """Returns the indexer's queries ``[B,T,Hi,Di]``, keys ``[B,T,Di]`` (rope applied) and head weights
    ``[B,T,Hi]`` (fp32, times ``Hi ** -0.5``), for ``sparse.index_scores`` with scale ``Di ** -0.5``."""

    n_heads: int
    head_dim: int
    rope_dim: int
    options: ModelOptions
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array, q_latent: jax.Array, cos: jax.Array, sin: jax.Array):
        o, hi, di, p = self.options, self.n_heads, self.head_dim, self.rope_dim
        q = Linear((hi, di), ("q_lora", "heads", "qk_head"), o, init_std=self.init_std, name="wq_b")(q_latent)
        k = Linear((di,), ("embed", "qk_head"), o, init_std=self.init_std, name="wk")(x)
        scale = self.param("k_norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("qk_head",)), (di,),
                           o.params_dtype)
        bias = self.param("k_norm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("qk_head",)), (di,),
                          o.params_dtype)
        k = layer_norm(k, scale, bias)
        q = jnp.concatenate([apply_rope(q[..., :p], cos, sin, interleave=False), q[..., p:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., None, :p], cos, sin, interleave=False)[..., 0, :], k[..., p:]], -1)
        kernel = self.param("weights_proj", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                         ("embed", "heads")),
                            (x.shape[-1], hi), o.params_dtype)
        # Kept in fp32 as the reference keeps ``weights_proj`` (out of the matmul recipe, as the router).
        w = MatmulRecipe(jnp.float32, platform=o.target_platform()).dot_general(x, kernel, contract_last(1, x.ndim))
        return q, k, w.astype(jnp.float32) * hi ** -0.5
