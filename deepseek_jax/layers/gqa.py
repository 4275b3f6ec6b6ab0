"""Grouped-query attention of the dense R1-Distill students (Qwen2, Llama 3; docs/reference.md, section 6).

``H`` query heads share ``Hk`` key/value heads (``H / Hk`` queries per group); rope rotates the two halves of
each whole head. Qwen2 adds a bias to q, k and v; Llama's ``attention_bias`` adds one to all four projections.
The attention core is the shared one (``layers/attention/core.py``; grouped heads).

Shapes: B batch, T queries, S keys, D model width, H query heads, K key/value heads, E head dim.
The KV cache holds the rotated keys and the values, ``[B,S,K,E]`` each (``layers/kv_cache.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.attention.context_parallel import attend
from deepseek_jax.layers.attention.core import attention
from deepseek_jax.layers.attention.layout import Layout, PagedLayout
from deepseek_jax.layers.attention.paged import paged_attention
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.rope import apply_rope
from deepseek_jax.parallel.context import context_size, gather_sequence


class GQA(nn.Module):
    config: ModelConfig
    options: ModelOptions

    def setup(self):
        c, o = self.config, self.options
        h, k, e, std = c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim, c.initializer_range
        bias = c.qkv_bias
        self.q_proj = Linear((h, e), ("embed", "heads", "qk_head"), o, init_std=std, use_bias=bias)
        self.k_proj = Linear((k, e), ("embed", "kv_heads", "qk_head"), o, init_std=std, use_bias=bias)
        self.v_proj = Linear((k, e), ("embed", "kv_heads", "v_head"), o, init_std=std, use_bias=bias)
        o_bias = c.model_type == "llama" and c.attention_bias
        self.o_proj = Linear((c.hidden_size,), ("heads", "v_head", "embed"), o, n_in=2, init_std=std, use_bias=o_bias)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x ``[B,T,D]`` -> q ``[B,T,H,E]``, k ``[B,T,K,E]`` (both rotated), v ``[B,T,K,E]``."""
        q = apply_rope(self.q_proj(x), cos, sin, interleave=False)
        k = apply_rope(self.k_proj(x), cos, sin, interleave=False)
        return q, k, self.v_proj(x)

    def _attend(self, q, k, v, layout: Layout, self_attention: bool = False) -> jax.Array:
        o = self.options
        out = attention(q, k, v, layout, self.config.softmax_scale, o.attention, o.attention_block,
                        o.target_platform(), self_attention)
        return self.o_proj(out)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: Layout) -> jax.Array:
        return self.prefill(x, cos, sin, layout)[0]

    def prefill(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: Layout):
        """Causal attention over a whole row; also returns the keys and values to cache.

        -> output ``[B,T,D]``, k ``[B,T,K,E]``, v ``[B,T,K,E]``. Under a mesh with a context axis the keys and
        values are all-gathered over it (repeated to the H query heads first, so the heads split like the
        queries') and each device attends with its own queries (``layers/attention/context_parallel.py``).
        """
        q, k, v = self.project(x, cos, sin)
        if context_size(x.shape[1]) == 1:
            return self._attend(q, k, v, layout, self_attention=True), k, v
        g = q.shape[2] // k.shape[2]
        k_all, v_all = (gather_sequence(jnp.repeat(a, g, axis=2)) for a in (k, v))
        keys = Layout(layout.q_index, layout.q_segment, gather_sequence(layout.k_index),
                      gather_sequence(layout.k_segment))
        o = self.options
        out = attend(q, k_all, v_all, keys, self.config.softmax_scale, o.attention, o.attention_block,
                     o.target_platform())
        return self.o_proj(out), k, v

    def decode(self, x, cos, sin, k_cache, v_cache, layout: Layout):
        """T new tokens attending to the cache ``k_cache, v_cache [B,S,K,E]`` plus themselves; ``layout``'s
        keys are the S slots then the T new tokens (``layers/attention/layout.py``'s ``cache_layout``).
        -> output ``[B,T,D]`` and the new tokens' k, v ``[B,T,K,E]``."""
        q, k, v = self.project(x, cos, sin)
        if isinstance(layout, PagedLayout):  # a ragged step: the cache's pages [N,G,K,E] (attention/paged.py)
            out = paged_attention((q,), (k_cache.astype(k.dtype),), v_cache.astype(v.dtype), (k,), v, layout,
                                  self.config.softmax_scale)
            return self.o_proj(out), k, v
        k_all = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
        v_all = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
        return self._attend(q, k_all, v_all, layout), k, v
