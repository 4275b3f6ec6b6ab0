"""The DeepSeek transformer: embed, scanned dense stack, scanned MoE stack, final norm, head, MTP modules.

The dense R1-Distill students (``model_type`` "qwen2" / "llama") are the same module: one dense stack of GQA
blocks, no MTP, and the head tied to the embedding when ``tie_word_embeddings``."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention import Layout, visible
from .block import Block
from .config import ModelConfig
from .context_parallel import context_size, permute, zigzag_order
from .linear import Embed, Linear
from .mtp import MTPModule
from .norm import RMSNorm
from .options import ModelOptions, remat_policy
from .rope import rope_cos_sin


def attention_layout(segment_ids: jax.Array, index: Optional[jax.Array] = None) -> Layout:
    """Who sees whom in a row of T tokens: causal (by ``index``, the tokens' places in the row, default
    ``0..T-1``), packed documents kept apart by ``segment_ids``, segment 0 (padding) seen by no one."""
    if index is None:
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    return Layout(index, segment_ids, index, segment_ids)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, T, T]`` causal mask that also keeps packed documents apart; segment id 0 marks padding."""
    return visible(attention_layout(segment_ids))


def mtp_segment_ids(segment_ids: jax.Array, depth: int) -> jax.Array:
    """Segment ids of MTP depth k's rows ``[B, T-k]``: row i pairs position i's hidden state with token i+k,
    so it belongs to a document only when both do; a row straddling two packed documents (or padding) gets 0
    and is seen by no other row."""
    t = segment_ids.shape[1]
    later, earlier = segment_ids[:, depth:], segment_ids[:, : t - depth]
    return jnp.where(later == earlier, later, 0)


def _stack(options: ModelOptions, length: int):
    block = Block
    if options.remat != "none":
        block = nn.remat(Block, policy=remat_policy(options.remat), prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=min(options.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


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
    """

    config: ModelConfig
    options: ModelOptions = ModelOptions()

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
    ):
        c, o = self.config, self.options
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        embed = Embed(c.vocab_size, c.hidden_size, o, c.initializer_range, name="embed_tokens")
        head = Linear((c.vocab_size,), ("embed", "vocab"), o, init_std=c.initializer_range, high_precision=True,
                      name="lm_head")

        h = x_emb = embed(tokens)
        layout = attention_layout(segment_ids)
        ctx = context_size(t)
        if ctx > 1:  # context parallelism: the layer stacks run in zig-zag order (context_parallel.py)
            order = zigzag_order(t, ctx)
            h, pos_z, seg_z = (permute(x, order) for x in (h, positions, segment_ids))
            layout = attention_layout(seg_z, permute(layout.q_index, order))
        else:
            pos_z, seg_z = positions, segment_ids
        cos, sin = rope_cos_sin(pos_z, c)
        valid = seg_z > 0
        moe_stats = []
        for name, _, length in c.layer_runs:
            is_moe = name.startswith("moe")
            h, stats = _stack(o, length)(c, o, moe=is_moe, rematerialized=o.remat != "none", name=name)(
                h, cos, sin, layout, valid)
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
        logits = None if stacked_head else embed.attend(h) if c.tie_word_embeddings else head(h)
        if not (want_mtp or return_router_stats or return_hidden):
            return logits
        aux: dict[str, Any] = {}
        if return_hidden:
            aux["hidden"] = h
        if return_router_stats:
            aux["router_stats"] = _concat_stats(moe_stats)
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
                    h_prev, _shift(x_emb[:, k:], k), cos_k, sin_k, attention_layout(seg_k), seg_k > 0
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
                mtp_logits = [head(hk[:, : t - k]) for k, hk in enumerate(hidden[1:], 1)]
            aux["mtp_logits"] = mtp_logits
            if return_router_stats and c.n_routed_experts > 0:
                aux["mtp_router_stats"] = jax.tree.map(lambda *xs: jnp.stack(xs), *mtp_stats)
        if self.is_initializing() and not (return_mtp or return_router_stats or return_hidden):
            return logits
        return logits, aux


def _shift(x: jax.Array, k: int) -> jax.Array:
    """``[B, T-k, ...]`` -> ``[B, T, ...]``, zero-padded at the end."""
    return jnp.pad(x, [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2))


def _concat_stats(stats: list[dict]) -> dict:
    if not stats:
        return {}
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *stats)
