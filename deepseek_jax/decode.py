"""Prefill and decode steps over the latent KV cache (``kvcache``), on the same params as ``Transformer``.

Prefill runs the full MLA path over right-padded prompts and fills the cache; decode runs the absorbed path
(REFERENCE.md section 1) for T new tokens per sequence at per-sequence positions. ``CachedTransformer`` has
the same submodule names as ``Transformer`` (``embed_tokens``, the ``config.layer_runs`` stacks, ``norm``,
``lm_head``, ``mtp_{k}``), so ``Transformer``'s params tree is used as is.

The jitted entry points donate the cache. On several devices, ``generation.generate(mesh=...)`` places the
params by the training rules and the cache over the batch axes; these steps follow their inputs' shardings.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import kvcache
from .block import CachedBlock
from .config import ModelConfig
from .linear import Embed, Linear
from .model import attention_mask
from .mtp import CachedMTPModule
from .norm import RMSNorm
from .options import ModelOptions
from .rope import rope_cos_sin

ATTN_MODES = ("full", "absorbed", "naive")


def _cached_stack(options: ModelOptions, length: int):
    return nn.scan(
        CachedBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=min(options.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class CachedTransformer(nn.Module):
    """``apply({"params": p}, tokens, positions, cache, masks, valid, ...) -> (logits, hidden, latents)``.

    part: "main" (embed, layer stacks, final norm, head) or "mtp_{k}" (MTP module k on ``h_prev``, then head).
    attn: "full" (prefill, ``masks [B,T,T]``, ``cache`` None) or "absorbed" / "naive" (``masks [B,T,S+T]``
    over the cached slots and new tokens, see ``cache_visibility``). ``out_index [B,G]`` picks the positions
    to compute logits for (default all).
    Returns logits ``[B,G or T,vocab]`` fp32, the final-normed hidden ``[B,T,D]``, and the new tokens'
    latents per cache entry (``{name: (c_kv, k_pe)}``, layer-stacked for the runs).
    """

    config: ModelConfig
    options: ModelOptions = ModelOptions()
    attn: str = "absorbed"
    part: str = "main"

    @nn.compact
    def __call__(self, tokens, positions, cache, masks, valid, h_prev=None, out_index=None):
        c, o = self.config, self.options
        embed = Embed(c.vocab_size, c.hidden_size, o, c.initializer_range, name="embed_tokens")
        head = Linear((c.vocab_size,), ("embed", "vocab"), o, init_std=c.initializer_range, high_precision=True,
                      name="lm_head")
        cos, sin = rope_cos_sin(positions, c)
        h = embed(tokens)
        latents = {}
        if self.part == "main":
            for name, _, length in c.layer_runs:
                stack = _cached_stack(o, length)(c, o, moe=name.startswith("moe"), attn=self.attn, name=name)
                h, latents[name] = stack(h, None if cache is None else cache[name], cos, sin, masks, valid)
            h = RMSNorm(c.rms_norm_eps, "embed", o, name="norm")(h)
        else:
            mtp = CachedMTPModule(c, o, attn=self.attn, name=self.part)
            h, latents[self.part] = mtp(h_prev, h, None if cache is None else cache[self.part], cos, sin, masks,
                                        valid)
        picked = h if out_index is None else jnp.take_along_axis(h, out_index[..., None], axis=1)
        return head(picked), h, latents


def _write_all(entries: dict, latents: dict, positions: jax.Array) -> dict:
    return {name: kvcache.write(entries[name], *latents[name], positions) for name in entries}


def _cache_len(cache: kvcache.Cache) -> int:
    return jax.tree.leaves(cache["main"])[0].shape[2]


def cache_visibility(positions: jax.Array, max_len: int, first_slot: int = 0) -> jax.Array:
    """``[B,T,S+T]``: the keys (S cached slots, then the T new tokens) that new tokens at consecutive
    ``positions [B,T]`` may attend to.

    Cached slots before the first new token (and from ``first_slot`` on; slots at or after it may hold stale
    values: padding, rejected drafts), then the new tokens causally (those at positions >= ``first_slot``).
    """
    s = jnp.arange(max_len)[None, None, :]
    cached = (s < positions[:, :1, None]) & (s >= first_slot)
    t = positions.shape[1]
    new = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & (positions >= first_slot)[:, None, :]
    return jnp.concatenate([jnp.broadcast_to(cached, (*positions.shape, max_len)), new], axis=-1)


def prefill_core(params, cache, tokens, lengths, *, config, options, mtp: bool = False):
    """Full-path prefill of right-padded prompts ``tokens [B,T]`` with ``lengths [B]``.

    Writes slots 0..T-1 of the main cache (slots past a prompt's length hold padding, never attended to)
    and, with ``mtp``, the first MTP module's cache (its row at position p pairs h_{p-1} with token p).
    Returns ``(cache, logits [B,V] at each prompt's last token, hidden [B,T,D])``.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = (positions < lengths[:, None]).astype(jnp.int32)
    model = CachedTransformer(config, options, attn="full")
    logits, hidden, latents = model.apply(
        {"params": params}, tokens, positions, None, attention_mask(seg), seg > 0,
        out_index=(lengths - 1)[:, None])
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], latents, positions)
    if mtp:
        h_prev = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
        seg_m = seg.at[:, 0].set(0)  # no MTP row at position 0
        _, _, lat = CachedTransformer(config, options, attn="full", part="mtp_0").apply(
            {"params": params}, tokens, positions, None, attention_mask(seg_m), seg_m > 0, h_prev=h_prev,
            out_index=jnp.zeros((b, 1), jnp.int32))
        cache["mtp"] = _write_all(cache["mtp"], lat, positions)
    return cache, logits[:, 0], hidden


def decode_core(params, cache, tokens, positions, *, config, options, absorb: bool = True):
    """T new tokens per sequence ``tokens [B,T]`` at consecutive ``positions [B,T]`` over the cache.

    Returns ``(cache with their latents written, logits [B,T,V], hidden [B,T,D])``.
    """
    vis = cache_visibility(positions, _cache_len(cache))
    model = CachedTransformer(config, options, attn="absorbed" if absorb else "naive")
    logits, hidden, latents = model.apply({"params": params}, tokens, positions, cache["main"], vis,
                                          jnp.ones(tokens.shape, jnp.bool_))
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], latents, positions)
    return cache, logits, hidden


def mtp_core(params, cache, h_prev, tokens, positions, *, config, options, depth: int = 0):
    """MTP module ``depth`` on rows pairing ``h_prev [B,T,D]`` (positions p-1) with ``tokens [B,T]`` (p).

    Returns ``(cache, logits [B,T,V] for the tokens at p+1, hidden [B,T,D])``.
    """
    name = f"mtp_{depth}"
    vis = cache_visibility(positions, _cache_len(cache), first_slot=depth + 1)
    model = CachedTransformer(config, options, attn="absorbed", part=name)
    logits, hidden, latents = model.apply({"params": params}, tokens, positions, cache["mtp"], vis,
                                          jnp.ones(tokens.shape, jnp.bool_), h_prev=h_prev)
    cache = dict(cache)
    cache["mtp"] = {**cache["mtp"], name: kvcache.write(cache["mtp"][name], *latents[name], positions)}
    return cache, logits, hidden


_STATIC = ("config", "options")
prefill = jax.jit(prefill_core, static_argnames=_STATIC + ("mtp",), donate_argnames=("cache",))
decode_step = jax.jit(decode_core, static_argnames=_STATIC + ("absorb",), donate_argnames=("cache",))
mtp_step = jax.jit(mtp_core, static_argnames=_STATIC + ("depth",), donate_argnames=("cache",))


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt lengths are padded to a power of two (at least ``minimum``) so prefill compiles per bucket."""
    b = minimum
    while b < n:
        b *= 2
    return b


def cache_length(prompt_bucket: int, max_new_tokens: int, extra: int = 0, multiple: int = 128) -> int:
    """Cache slots for a prompt bucket plus the new tokens, rounded up so nearby requests share a compile."""
    need = prompt_bucket + max_new_tokens + extra
    return -(-need // multiple) * multiple


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_logits(params, tokens, *, config, options):
    """Full-path logits at every position of unpadded ``tokens [B,T]``."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    model = CachedTransformer(config, options, attn="full")
    return model.apply({"params": params}, tokens, pos, None, attention_mask(seg), seg > 0)[0]


def decode_all_positions(params, tokens, *, config, options=ModelOptions(), cache_dtype="float32",
                         absorb: bool = True, prefill_len: int = 1):
    """Logits ``[B,T,V]`` of ``tokens [B,T]``: prefill ``prefill_len`` tokens, then decode one at a time.

    A reference-shaped helper (tests, benchmarks): every position after the prefill comes from the
    cached decode path, so it must match ``Transformer``'s full forward.
    """
    b, t = tokens.shape
    cache = kvcache.init_cache(config, b, cache_length(prefill_len, t), cache_dtype)
    lengths = jnp.full((b,), prefill_len, jnp.int32)
    cache, logits0, _ = prefill(params, cache, tokens[:, :prefill_len], lengths, config=config, options=options)
    if prefill_len > 1:  # the prefill's logits at every prompt position, from the full path
        first = _prefill_logits(params, tokens[:, :prefill_len], config=config, options=options)
    else:
        first = logits0[:, None]
    out = [first]
    for i in range(prefill_len, t):
        pos = jnp.full((b, 1), i, jnp.int32)
        cache, logits, _ = decode_step(params, cache, tokens[:, i:i + 1], pos, config=config, options=options,
                                       absorb=absorb)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


__all__ = [
    "CachedTransformer", "bucket_length", "cache_length", "cache_visibility", "decode_all_positions",
    "decode_core", "decode_step", "mtp_core", "mtp_step", "prefill", "prefill_core",
]
