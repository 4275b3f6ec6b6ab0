"""Multi-head Latent Attention (DeepSeek-V2 section 2.1; docs/reference.md, section 1).

Shapes: B batch, T query length, S key length, H heads, D model width, R kv_lora_rank, P qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.attention.context_parallel import attend, sparse_attend
from deepseek_jax.layers.attention.core import attention
from deepseek_jax.layers.attention.layout import Layout, PagedLayout, visible
from deepseek_jax.layers.attention.paged import paged_attention
from deepseek_jax.layers.attention.sparse import index_scores, indexer_kl_loss, sparse_core
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.lora import LoraWeight
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import apply_rope
from deepseek_jax.parallel.context import context_size, gather_sequence
from deepseek_jax.parallel.rules import constrain

# The q/kv latent norms are built with the reference's default eps (1e-6), not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    config: ModelConfig
    options: ModelOptions

    def setup(self):
        c, o = self.config, self.options
        H, std = c.num_attention_heads, c.initializer_range
        if c.q_lora_rank is None:
            self.q_proj = Linear((H, c.qk_head_dim), ("embed", "heads", "qk_head"), o, init_std=std)
        else:
            self.q_a_proj = Linear((c.q_lora_rank,), ("embed", "q_lora"), o, init_std=std)
            self.q_a_layernorm = RMSNorm(LATENT_NORM_EPS, "q_lora", o)
            self.q_b_proj = Linear((H, c.qk_head_dim), ("q_lora", "heads", "qk_head"), o, init_std=std)
        self.kv_a_proj_with_mqa = Linear((c.kv_cache_dim,), ("embed", "kv_lora"), o, init_std=std)
        self.kv_a_layernorm = RMSNorm(LATENT_NORM_EPS, "kv_lora", o)
        self.kv_b_proj = Linear((H, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_head"), o,
                                init_std=std)
        self.o_proj = Linear((c.hidden_size,), ("heads", "v_head", "embed"), o, n_in=2, init_std=std)
        if c.has_indexer:
            self.indexer = Indexer(c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim, o, init_std=std)

    def query(self, x: jax.Array, cos: jax.Array, sin: jax.Array, with_latent: bool = False):
        """x ``[B,T,D]`` -> q_nope ``[B,T,H,N]``, q_pe ``[B,T,H,P]`` (rope applied); with ``with_latent`` also the
        query latent ``[B,T,L]`` (``q_a_layernorm``'s output, which V3.2's indexer reads)."""
        latent = None
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(latent)
        n = self.config.qk_nope_head_dim
        q_nope, q_pe = q[..., :n], apply_rope(q[..., n:], cos, sin, self.config.rope_interleave)
        return (q_nope, q_pe, latent) if with_latent else (q_nope, q_pe)

    def latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x ``[B,T,D]`` -> normed latent c_kv ``[B,T,R]`` and shared rope key k_pe ``[B,T,P]``.

        These two are all the absorbed decode path caches (``kv_lora_rank + qk_rope_head_dim`` per token).
        """
        r = self.config.kv_lora_rank
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., :r])
        k_pe = apply_rope(kv[..., None, r:], cos, sin, self.config.rope_interleave)[..., 0, :]
        return c_kv, k_pe

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: Layout) -> jax.Array:
        """The full (non-absorbed) path: expand the latent to per-head keys and values."""
        return self.prefill(x, cos, sin, layout)[0]

    def _attend(self, q, k, v, layout: Layout, self_attention: bool = False):
        o = self.options
        return attention(q, k, v, layout, self.config.softmax_scale, o.attention, o.attention_block,
                         o.target_platform(), self_attention)

    def _expand(self, c_kv, k_pe):
        """Latents ``[B,S,R]``, ``[B,S,P]`` -> per-head keys ``[B,S,H,N+P]`` and values ``[B,S,H,V]``."""
        c = self.config
        kv = self.kv_b_proj(c_kv)  # [B,S,H,N+V]
        k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:-1], c.qk_rope_head_dim))
        return jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1), v

    def _expanded_attention(self, q_nope, q_pe, c_kv, k_pe, layout: Layout, self_attention: bool = False):
        """Expand latents to per-head keys/values and attend; -> ``[B,T,D]``. ``self_attention``: the layout is
        the row's own tokens at places 0..T-1 (``layers/attention/core.py``)."""
        k, v = self._expand(c_kv, k_pe)
        return self.o_proj(self._attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v, layout, self_attention))

    def prefill(self, x: jax.Array, cos: jax.Array, sin: jax.Array, layout: Layout):
        """The full path over a whole prompt; also returns the latents to cache.

        x ``[B,T,D]``; ``layout`` is ``attention_layout``'s (the row's own tokens at places 0..T-1, packed
        documents, padding) -> output ``[B,T,D]``,
        c_kv ``[B,T,R]``, k_pe ``[B,T,P]``. Under a mesh with a context axis (T split over it), the latents are
        all-gathered over it and each device attends with its own queries (``layers/attention/context_parallel.py``).
        """
        if self.config.has_indexer:
            return self._sparse(x, cos, sin, layout)  # DeepSeek-V3.2: plus the indexer keys to cache
        q_nope, q_pe = self.query(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        if context_size(x.shape[1]) == 1:
            return self._expanded_attention(q_nope, q_pe, c_kv, k_pe, layout, True), c_kv, k_pe
        keys = Layout(layout.q_index, layout.q_segment, gather_sequence(layout.k_index),
                      gather_sequence(layout.k_segment))
        return self._context_attention(q_nope, q_pe, gather_sequence(c_kv), gather_sequence(k_pe), keys), c_kv, k_pe

    def _context_attention(self, q_nope, q_pe, c_all, pe_all, keys: Layout):
        """Context parallelism's dense attention: the device's queries against the whole row's latents
        (``c_all`` / ``pe_all`` and ``keys``' key side gathered along the sequence) -> ``[B,T,D]``."""
        k, v = self._expand(c_all, pe_all)
        o = self.options
        out = attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v, keys, self.config.softmax_scale, o.attention,
                     o.attention_block, o.target_platform())
        return self.o_proj(out)

    def _absorbed_weights(self):
        """``kv_b_proj`` split into its key part ``[R,H,N]`` and value part ``[R,H,V]``."""
        p = nn.meta.unbox(self.variables["params"]["kv_b_proj"])  # (boxed while initializing)
        w = p["kernel"]  # [R,H,N+V]
        if "lora_a" in p:  # LoRA on kv_b_proj: the merged kernel
            w = LoraWeight(w, p["lora_a"], p["lora_b"], self.options.lora.scale, 1)
        n = self.config.qk_nope_head_dim
        return w[..., :n], w[..., n:]

    def _sparse(self, x, cos, sin, layout: Layout, cached=None):
        """DeepSeek-V3.2 (DSA): the indexer picks each query's top ``index_topk`` visible keys
        (``sparse.indexer_topk``, blockwise), and attention runs in the absorbed form over those latent entries
        only (``sparse.sparse_latent_attention``): O(T k) attention, never a ``[T, S]`` score. ``cached``: the
        cache's ``(c_kv, k_pe, index_k)`` ``[B,S,...]``, which the new tokens' keys follow (``layout``'s keys
        are the S slots then the T new tokens). -> output ``[B,T,D]`` and the new tokens' c_kv, k_pe, index_k."""
        c, o = self.config, self.options
        stage = o.indexer_loss if cached is None else None  # the indexer's training stage (ModelOptions)
        q_nope, q_pe, q_latent = self.query(x, cos, sin, with_latent=True)
        c_new, pe_new = self.latent(x, cos, sin)
        if stage is None:
            qi, ki_new, wi = self.indexer(x, q_latent, cos, sin)
        else:  # trained by its own KL only: its input is detached from the main loss
            qi, ki_new, wi = self.indexer(jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent), cos, sin)
        parallel = cached is None and context_size(x.shape[1]) > 1  # T split over the context axis
        # The keys as parts laid end to end: the cache then the new tokens, each read in place (only the selected
        # latent rows are gathered; the cache is never concatenated with the new tokens); or the row's own.
        parts = [(c_new, pe_new, ki_new)]
        if cached is not None:
            parts.insert(0, tuple(old.astype(new.dtype) for old, new in zip(cached, parts[0])))
        elif parallel:  # the indexer keys travel with the latent: one all-gather of 576 + Di values per token
            keys = [gather_sequence(a) for a in (c_new, pe_new, ki_new, layout.k_index, layout.k_segment)]
            # Back in the row's order (the zig-zag order's inverse, read from the keys' places), so that the
            # top-k breaks ties between equal index scores as one device does: to the earlier key.
            order = jnp.argsort(keys[3], axis=1)
            *row, k_index, k_segment = (jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)),
                                                            axis=1) for a in keys)
            parts = [tuple(row)]
            layout = Layout(layout.q_index, layout.q_segment, k_index, k_segment)
        if self.is_initializing():
            self.kv_b_proj(c_new)  # creates the weight the absorbed form reads
        w_k, w_v = self._absorbed_weights()
        dtype = c_new.dtype
        q = jnp.concatenate([_einsum("bthn,rhn->bthr", q_nope, w_k, dtype), q_pe.astype(dtype)], axis=-1)
        kv_parts = tuple((c_part, pe_part.astype(dtype)) for c_part, pe_part, _ in parts)
        ki_parts = tuple(part[2] for part in parts)
        i_scale = c.index_head_dim ** -0.5
        if stage == "warmup":
            # Dense attention (the main model is frozen in this stage) and the KL over every visible key.
            (c_all, pe_all, ki_all), = parts
            if parallel:
                out = self._context_attention(q_nope, q_pe, c_all, pe_all, layout)
            else:
                out = self._expanded_attention(q_nope, q_pe, c_new, pe_new, layout, True)
            seen = visible(layout)
            kv = jnp.concatenate([c_all, pe_all.astype(dtype)], axis=-1)
            scores = jnp.einsum("bthe,bse->bhts", q.astype(jnp.float32), kv.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST) * c.softmax_scale
            probs = jax.nn.softmax(jnp.where(seen[:, None], scores, -1e30), axis=-1).sum(1)
            self.sow("indexer_kl", "kl", indexer_kl_loss(index_scores(qi, ki_all, wi, i_scale), probs, seen))
            return out, c_new, pe_new, ki_new
        block = o.attention_block
        core = partial(sparse_core, topk=c.index_topk, scale=c.softmax_scale, index_scale=i_scale,
                       rank=c.kv_lora_rank, block=block, with_kl=stage == "sparse")
        o_lat, kl_parts, chosen = (sparse_attend(core, q, kv_parts, qi, ki_parts, wi, layout) if parallel
                                   else core(q, kv_parts, qi, ki_parts, wi, layout))
        # Which keys each query read (slots of the cache then the new tokens; -1: none), for whoever asks for
        # the "intermediates" collection (the notebooks' picture); under context parallelism, slots of the row.
        self.sow("intermediates", "indexer_choice", chosen)
        if stage == "sparse":  # the KL over the selected keys, against the attention's own probabilities
            self.sow("indexer_kl", "kl", indexer_kl_loss(*kl_parts))
        # Pinned to the batch / sequence split: left free, the SPMD partitioner reshards o_lat along R to meet
        # kv_b_proj's FSDP-sharded kernel, replicating [B,T,H,R] on every device.
        o_lat = constrain(o_lat, ("act_batch", "act_length", "heads", None))
        out = constrain(_einsum("bthr,rhv->bthv", o_lat, w_v, dtype), ("act_batch", "act_length", "heads", None))
        return self.o_proj(out), c_new, pe_new, ki_new

    def decode(self, x, cos, sin, c_kv_cache, k_pe_cache, layout: Layout, absorb: bool = True,
               index_k_cache=None):
        """T new tokens attending to a latent cache plus themselves (decode, speculative verification, chunks of
        a long prompt).

        x ``[B,T,D]``; c_kv_cache ``[B,S,R]``, k_pe_cache ``[B,S,P]``; ``layout``'s keys are the S cached slots
        followed by the T new tokens (``layers/attention/layout.py``'s ``cache_layout``).
        ``absorb`` (docs/reference.md, section 1) folds ``kv_b_proj`` into the query and the output, so attention
        runs in the R-dim latent space against one shared "head" (the cache itself) and the cache is never
        expanded; ``absorb=False`` expands it (the naive path, for comparison).
        Returns output ``[B,T,D]`` and the new tokens' c_kv ``[B,T,R]``, k_pe ``[B,T,P]``.
        DeepSeek-V3.2 (``index_k_cache [B,S,Di]``, the indexer's cached keys): the indexer scores the cache and the
        new tokens, and attention reads each query's top-k latent entries only, always in the absorbed form
        (``absorb`` is ignored); the new tokens' indexer keys are returned too.
        """
        c = self.config
        if c.has_indexer:
            return self._sparse(x, cos, sin, layout, (c_kv_cache, k_pe_cache, index_k_cache))
        q_nope, q_pe = self.query(x, cos, sin)
        c_new, pe_new = self.latent(x, cos, sin)
        if isinstance(layout, PagedLayout):
            return self._paged(q_nope, q_pe, c_new, pe_new, c_kv_cache, k_pe_cache, layout, absorb), c_new, pe_new
        c_all = jnp.concatenate([c_kv_cache.astype(c_new.dtype), c_new], axis=1)  # [B,S+T,R]
        pe_all = jnp.concatenate([k_pe_cache.astype(pe_new.dtype), pe_new], axis=1)  # [B,S+T,P]
        if not absorb:
            return self._expanded_attention(q_nope, q_pe, c_all, pe_all, layout), c_new, pe_new
        w_k, w_v = self._absorbed_weights()
        q_abs = _einsum("bthn,rhn->bthr", q_nope, w_k, c_all.dtype)
        q = jnp.concatenate([q_abs, q_pe.astype(q_abs.dtype)], axis=-1)  # [B,T,H,R+P]
        k = jnp.concatenate([c_all, pe_all], axis=-1)[:, :, None, :]  # [B,S+T,1,R+P]
        o_lat = self._attend(q, k, c_all[:, :, None, :], layout)  # [B,T,H,R]
        out = _einsum("bthr,rhv->bthv", o_lat, w_v, c_all.dtype)  # [B,T,H,V]
        return self.o_proj(out), c_new, pe_new

    def _paged(self, q_nope, q_pe, c_new, pe_new, c_pages, pe_pages, layout: PagedLayout, absorb: bool):
        """The absorbed path over a ragged step's pages (``c_pages [N,G,R]``, ``pe_pages [N,G,P]``,
        ``attention/paged.py``): the latent and rope scores summed, never concatenated -> ``[B,T,D]``."""
        if not absorb:
            raise ValueError("a paged (ragged) decode step runs the absorbed path only (absorb=True)")
        w_k, w_v = self._absorbed_weights()
        dtype = c_new.dtype
        q_abs = _einsum("bthn,rhn->bthr", q_nope, w_k, dtype)  # [B,T,H,R]
        one = (slice(None), slice(None), None)  # the shared "head" of the latent
        o_lat = paged_attention((q_abs, q_pe.astype(dtype)), (c_pages[one], pe_pages[one].astype(dtype)),
                                c_pages[one], (c_new[one], pe_new[one].astype(dtype)), c_new[one], layout,
                                self.config.softmax_scale)
        return self.o_proj(_einsum("bthr,rhv->bthv", o_lat, w_v, dtype))


def _einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """An einsum in a's dtype: full fp32 precision when a is fp32; fp32 accumulation requested otherwise
    except on CPU, whose dot thunk has no bf16 x bf16 -> fp32 for these (batched matrix-vector) shapes."""
    dtype = a.dtype
    if dtype == jnp.float32:
        out = jnp.einsum(spec, a, b.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    elif jax.default_backend() == "cpu":
        out = jnp.einsum(spec, a, b.astype(dtype))
    else:
        out = jnp.einsum(spec, a, b.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)
