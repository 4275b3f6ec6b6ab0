"""DeepSeek-V4's decoder (docs/reference.md, V4): the embedding copied onto ``hc_mult`` residual streams, layers
that each read and write the streams through hyper-connections (``layers/hyper.py``) around a compressed
attention (``layers/csa.py``) and an MoE (learned router, or hash routing on the token id in the first layers),
then the streams collapsed (``hc_head``), normed and projected to the vocabulary.

``Transformer`` runs this body for ``model_type`` "deepseek_v4" (``v4_forward``): the params sit beside the other
models' (``embed_tokens``, ``lm_head``, ``norm``) with one scanned stack per run of equal layers
(``ModelConfig.layer_runs``: one attention kind and one router kind).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config.model import CSA, HCA, SWA, ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers import kv_cache
from deepseek_jax.layers.attention.layout import Layout, attention_layout
from deepseek_jax.layers.csa import CompressedAttention, Ropes, v4_ropes
from deepseek_jax.layers.hyper import HyperConnection, HyperHead, expand
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.models.block import scanned
from deepseek_jax.moe.layer import MoE
from deepseek_jax.parallel.rules import constrain

STREAMS = ("act_batch", "act_length", None, "act_embed")
_KINDS = {"csa": CSA, "hca": HCA, "swa": SWA}


def run_kinds(name: str) -> tuple[str, bool]:
    """A V4 run's attention layer type and whether its MoE is hash-routed, from its name (``hash_hca_0``)."""
    router, attn, _ = name.split("_")
    return _KINDS[attn], router == "hash"


class V4Block(nn.Module):
    """One V4 layer on the streams ``h [B,T,N,D]`` -> ``(h, out)``: ``out`` the router statistics in "train", the new
    tokens' cache values in "prefill" / "decode" (``CompressedAttention``). ``nn.scan``-shaped: the streams are the
    carry, ``layer_cache`` (the layer's cache entry in "decode", else None) is scanned over, the rest broadcast."""

    config: ModelConfig
    options: ModelOptions
    layer_type: str
    hash_routed: bool
    mode: str = "train"
    rematerialized: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, layer_cache, ropes: Ropes, layout: Layout, segments: jax.Array,
                 token_ids: jax.Array, positions: jax.Array):
        c, o = self.config, self.options
        if self.mode != "decode":
            h = constrain(h, STREAMS)

        def hyper(name):
            return HyperConnection(c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps, c.initializer_range,
                                   name=name)

        post, comb, x = hyper("attn_hc")(h)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="input_layernorm")(x)
        cache = None if layer_cache is None else kv_cache.read_v4(layer_cache, o.compute_dtype)
        a = CompressedAttention(c, o, self.layer_type, self.mode, name="self_attn")(x, ropes, layout, segments,
                                                                                   positions, cache)
        if self.mode != "train":
            a, new = a
        h = expand(h, a, post, comb)
        post, comb, x = hyper("ffn_hc")(h)
        x = RMSNorm(c.rms_norm_eps, "embed", o, name="post_attention_layernorm")(x)
        y, stats = MoE(c, o, self.rematerialized, self.hash_routed, name="mlp")(x, segments, token_ids)
        h = expand(h, y, post, comb)
        if self.mode == "train":
            return constrain(h, STREAMS), stats
        return h, new


def v4_forward(config: ModelConfig, options: ModelOptions, embed, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array, *, mode: str = "train", cache=None,
               layout: Optional[Layout] = None) -> tuple[jax.Array, Any]:
    """The final-normed hidden states ``[B,T,D]`` and, in "train", the learned-router runs' statistics (a list;
    hash-routed layers have no router to balance), in "prefill" / "decode" the new tokens' cache values per run
    (``{run: {name: [L,B,T,...]}}``). ``layout``: who sees whom in "prefill" (over the prompts) and "decode" (its
    ``q_index`` the new tokens' positions); ``cache``: the main cache's runs in "decode". Called inside
    ``Transformer``'s compact scope: the modules made here are its children."""
    c, o = config, options
    b, t = tokens.shape
    h = embed(tokens)
    streams = jnp.broadcast_to(h[:, :, None, :], (b, t, c.hc_mult, h.shape[-1]))
    if layout is None:
        layout = attention_layout(segment_ids)
    ropes = v4_ropes(positions, c)
    train = mode == "train"
    out: Any = [] if train else {}
    for name, _, length in c.layer_runs:
        layer_type, hashed = run_kinds(name)
        stack = scanned(V4Block, o, length, train=train, broadcast=5)(
            c, o, layer_type, hashed, mode, rematerialized=train and o.remat != "none", name=name)
        streams, got = stack(streams, None if cache is None else cache[name], ropes, layout, segment_ids, tokens,
                             positions)
        if not train:
            out[name] = got
        elif not hashed:
            out.append(got)
    h = HyperHead(c.hc_mult, c.hc_eps, c.rms_norm_eps, c.initializer_range, name="hc_head")(streams)
    return RMSNorm(c.rms_norm_eps, "embed", o, name="norm")(h), out
