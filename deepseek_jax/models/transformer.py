"""The DeepSeek transformer: embed, scanned dense stack, scanned MoE stack, final norm, head, MTP modules.

The dense R1-Distill students (``model_type`` "qwen2" / "llama") are the same module: one dense stack of GQA
blocks, no MTP, and the head tied to the embedding when ``tie_word_embeddings``.

One module for training and inference, with the same parameters: ``mode`` "train" is the forward pass over
whole rows (what ``apply(params, tokens)`` runs); "prefill" and "decode" run the blocks' inference paths over a
KV cache (``Block``), one part of the model at a time (``part``: the main stack, or one MTP module as the draft
model of speculative decoding). ``inference/steps.py`` drives those modes.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers.attention.layout import Layout, attention_layout
from deepseek_jax.layers.embed import Embed
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin
from deepseek_jax.models.block import MODES, Block, scanned
from deepseek_jax.models.mtp import MTPModule
from deepseek_jax.models.v4 import v4_forward
from deepseek_jax.parallel.context import context_size, permute, zigzag_order


def mtp_segment_ids(segment_ids: jax.Array, depth: int) -> jax.Array:
    """Segment ids of MTP depth k's rows ``[B, T-k]``: row i pairs position i's hidden state with token i+k,
    so it belongs to a document only when both do; a row straddling two packed documents (or padding) gets 0
    and is seen by no other row."""
    t = segment_ids.shape[1]
    later, earlier = segment_ids[:, depth:], segment_ids[:, : t - depth]
    return jnp.where(later == earlier, later, 0)


class Transformer(nn.Module):
    """``apply({"params": p}, tokens)`` -> logits ``[B, T, vocab]`` (fp32).

    Keyword flags add a second return value, a dict with:
      ``mtp_logits`` (``return_mtp``): list over depths k = 1..D of ``[B, T-k, vocab]``; entry i of depth k
          predicts token ``i + k + 1``.
      ``router_stats`` (``return_router_stats``): ``{"counts", "scores"}`` each ``[n_moe_layers, B, E]``
          (see ``MoE``), and ``mtp_router_stats`` likewise ``[D, B, E]`` when MTP runs.
      ``hidden`` (``return_hidden``): the final-normed hidden states ``[B, T, D]``.
    positions ``[B, T]`` default to 0..T-1; segment_ids ``[B, T]`` (default all 1) separate packed documents,
    0 marks padding.

    ``mode`` "prefill" / "decode" (``absorb``: MLA's absorbed decode path, or the expanded one) run ``part``
    ("main": embed, layer stacks, final norm, head; "mtp_{k}": MTP module k on ``h_prev``, then the head) as
    ``apply(params, tokens, positions, cache=..., layout=..., h_prev=..., out_index=...)``: ``cache`` holds the
    part's entries (``layers/kv_cache.py``; None for "prefill"), ``layout`` says who sees whom
    (``attention_layout`` over the prompts for "prefill", ``cache_layout`` for "decode"; padding has segment 0),
    ``out_index [B,G]`` picks the positions to compute logits for (default all). It returns logits
    ``[B,G or T,vocab]`` fp32, the final-normed hidden ``[B,T,D]`` and the new tokens' cache values per entry
    (``{name: values}``, layer-stacked for the runs).
    """

    config: ModelConfig
    options: ModelOptions = ModelOptions()
    mode: str = "train"
    absorb: bool = True
    part: str = "main"

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        *,
        return_mtp: bool = False,
        return_router_stats: bool = False,
        return_hidden: bool = False,
        cache: Optional[dict] = None,
        layout: Optional[Layout] = None,
        h_prev: Optional[jax.Array] = None,
        out_index: Optional[jax.Array] = None,
    ):
        c, o = self.config, self.options
        if self.mode not in MODES:
            raise ValueError(f"Transformer.mode = {self.mode!r}: expected one of {MODES}")
        embed = Embed(c.vocab_size, c.hidden_size, o, c.initializer_range, name="embed_tokens")
        head = Linear((c.vocab_size,), ("embed", "vocab"), o, init_std=c.initializer_range, high_precision=True,
                      name="lm_head")

        def logits_of(h):
            return embed.attend(h) if c.tie_word_embeddings else head(h)

        if self.mode != "train":
            return self._cached(embed, logits_of, tokens, positions, cache, layout, h_prev, out_index)
        return self._forward(embed, head, logits_of, tokens, positions, segment_ids, return_mtp,
                             return_router_stats, return_hidden)

    def _forward(self, embed, head, logits_of, tokens, positions, segment_ids, return_mtp, return_router_stats,
                 return_hidden):
        c, o = self.config, self.options
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if c.is_v4:
            return self._forward_v4(embed, logits_of, tokens, positions, segment_ids, return_router_stats,
                                    return_hidden)
        h = x_emb = embed(tokens)
        layout = attention_layout(segment_ids)
        ctx = context_size(t)
        if ctx > 1:  # context parallelism: the layer stacks run in zig-zag order (parallel/context.py)
            order = zigzag_order(t, ctx)
            h, pos_z, seg_z = (permute(x, order) for x in (h, positions, segment_ids))
            layout = attention_layout(seg_z, permute(layout.q_index, order))
        else:
            pos_z, seg_z = positions, segment_ids
        cos, sin = rope_cos_sin(pos_z, c)
        moe_stats = []
        for name, _, length in c.layer_runs:
            is_moe = name.startswith("moe")
            stack = scanned(Block, o, length, train=True)(c, o, moe=is_moe, rematerialized=o.remat != "none",
                                                          name=name)
            h, stats = stack(h, None, cos, sin, layout, seg_z)
            if is_moe:
                moe_stats.append(stats)
        if ctx > 1:
            h = permute(h, np.argsort(order))
        h = RMSNorm(c.rms_norm_eps, "embed", o, name="norm")(h)
        want_mtp = (return_mtp or self.is_initializing()) and c.num_nextn_predict_layers > 0
        # With MTP (and an untied head) the head runs once, below, over the main and every depth's hidden states.
        # Not under context parallelism: there each depth's T - k rows split unevenly over the context axis, and
        # slicing them off the stacked logits (vocabulary-wide) would re-lay out the logits, not the hidden states.
        stacked_head = want_mtp and not c.tie_word_embeddings and ctx == 1
        logits = None if stacked_head else logits_of(h)
        if not (want_mtp or return_router_stats or return_hidden):
            return logits
        aux = _aux(h, moe_stats, return_router_stats, return_hidden)
        if want_mtp:
            # Depth k's row i pairs h_prev[i] with token i + k. The rows are kept T long (the last k are padding,
            # segment 0) so that every depth has the main model's shapes (and splits like it over a mesh). Token
            # i + k's embedding is row i + k of the main model's: one lookup (and one scatter of its gradient
            # into the vocabulary-sized table) serves every depth.
            hidden, mtp_stats, h_prev = [h], [], h
            for k in range(1, c.num_nextn_predict_layers + 1):
                if t <= k:
                    raise ValueError(f"MTP depth {k} needs sequences longer than {k} tokens, got T={t}")
                seg_k = _shift(mtp_segment_ids(segment_ids, k), k)
                cos_k, sin_k = rope_cos_sin(_shift(positions[:, k:], k), c)
                h_prev, stats = MTPModule(c, o, name=f"mtp_{k - 1}")(
                    h_prev, _shift(x_emb[:, k:], k), None, cos_k, sin_k, attention_layout(seg_k), seg_k
                )
                hidden.append(h_prev)
                mtp_stats.append(stats)
            if stacked_head:
                # One head matmul over [1 + D, B, T, dim] (depths on a new leading dim, so every one splits over
                # the mesh as the main model's rows do): under FSDP the vocabulary-sized head is gathered once
                # and its weight gradient is one partial sum, not one per depth.
                every = head(jnp.stack(hidden))
                logits, mtp_logits = every[0], [every[k][:, : t - k] for k in range(1, len(hidden))]
            else:
                mtp_logits = [logits_of(hk[:, : t - k]) for k, hk in enumerate(hidden[1:], 1)]
            aux["mtp_logits"] = mtp_logits
            if return_router_stats and c.n_routed_experts > 0:
                aux["mtp_router_stats"] = jax.tree.map(lambda *xs: jnp.stack(xs), *mtp_stats)
        if self.is_initializing() and not (return_mtp or return_router_stats or return_hidden):
            return logits
        return logits, aux

    def _forward_v4(self, embed, logits_of, tokens, positions, segment_ids, return_router_stats, return_hidden):
        """DeepSeek-V4's forward pass (``models/v4.py``). Its MTP module is not built yet: ``return_mtp`` gives
        no ``mtp_logits``."""
        h, moe_stats = v4_forward(self.config, self.options, embed, tokens, positions, segment_ids)
        logits = logits_of(h)
        if not (return_router_stats or return_hidden):
            return logits
        return logits, _aux(h, moe_stats, return_router_stats, return_hidden)

    def _cached(self, embed, logits_of, tokens, positions, cache, layout, h_prev, out_index):
        c, o = self.config, self.options
        segments = layout.q_segment
        new = {}
        if c.is_v4:
            if self.part != "main":
                raise ValueError(f"part {self.part!r}: DeepSeek-V4's MTP module is not built here")
            h, new = v4_forward(c, o, embed, tokens, positions, segments, mode=self.mode, cache=cache, layout=layout)
        elif self.part == "main":
            cos, sin = rope_cos_sin(positions, c)
            h = embed(tokens)
            for name, _, length in c.layer_runs:
                stack = scanned(Block, o, length, train=False)(c, o, moe=name.startswith("moe"), mode=self.mode,
                                                      absorb=self.absorb, name=name)
                h, new[name] = stack(h, None if cache is None else cache[name], cos, sin, layout, segments)
            h = RMSNorm(c.rms_norm_eps, "embed", o, name="norm")(h)
        else:
            cos, sin = rope_cos_sin(positions, c)
            mtp = MTPModule(c, o, mode=self.mode, absorb=self.absorb, name=self.part)
            h, new[self.part] = mtp(h_prev, embed(tokens), None if cache is None else cache[self.part], cos, sin,
                                    layout, segments)
        picked = h if out_index is None else jnp.take_along_axis(h, out_index[..., None], axis=1)
        return logits_of(picked), h, new


def abstract_params(config: ModelConfig, options: ModelOptions = ModelOptions()) -> dict:
    """``Transformer(config, options)``'s params tree as shapes (``jax.eval_shape``: no memory spent), each leaf
    boxed with its logical axis names (``nn.Partitioned``; ``nn.meta.unbox`` strips them)."""
    init = Transformer(config, options).init
    return jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def _shift(x: jax.Array, k: int) -> jax.Array:
    """``[B, T-k, ...]`` -> ``[B, T, ...]``, zero-padded at the end."""
    return jnp.pad(x, [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2))


def _aux(h, moe_stats: list[dict], router_stats: bool, hidden: bool) -> dict[str, Any]:
    """The forward pass's second return value, without MTP: the final hidden states and the router statistics."""
    aux: dict[str, Any] = {}
    if hidden:
        aux["hidden"] = h
    if router_stats:
        aux["router_stats"] = _concat_stats(moe_stats)
    return aux


def _concat_stats(stats: list[dict]) -> dict:
    if not stats:
        return {}
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *stats)
