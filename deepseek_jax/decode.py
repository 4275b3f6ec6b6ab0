"""Prefill and decode steps over the latent KV cache (``kvcache``), on the same params as ``Transformer``.

Prefill runs the full MLA path over right-padded prompts and fills the cache; decode runs the absorbed path
(REFERENCE.md section 1) for T new tokens per sequence at per-sequence positions. ``CachedTransformer`` has
the same submodule names as ``Transformer`` (``embed_tokens``, the ``config.layer_runs`` stacks, ``norm``,
``lm_head``, ``mtp_{k}``), so ``Transformer``'s params tree is used as is. A dense R1-Distill student runs the
same steps over a cache of its rotated keys and values (``gqa.GQA``; "absorbed" and "naive" are the same for it).

The jitted entry points donate the cache. On several devices, ``generation.generate(mesh=...)`` places the
params by the training rules and the cache over the batch axes; these steps follow their inputs' shardings.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import kvcache
from .block import CachedBlock
from .config import ModelConfig
from .linear import Embed, Linear
from .attention import Layout, visible
from .model import attention_layout
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
    """``apply({"params": p}, tokens, positions, cache, layout, valid, ...) -> (logits, hidden, latents)``.

    part: "main" (embed, layer stacks, final norm, head) or "mtp_{k}" (MTP module k on ``h_prev``, then head).
    attn: "full" (prefill over T tokens, ``cache`` None) or "absorbed" / "naive" (``layout``'s keys are the
    cached slots then the new tokens, see ``cache_layout``). ``out_index [B,G]`` picks the positions
    to compute logits for (default all).
    Returns logits ``[B,G or T,vocab]`` fp32, the final-normed hidden ``[B,T,D]``, and the new tokens'
    latents per cache entry (``{name: (c_kv, k_pe)}``, layer-stacked for the runs).
    """

    config: ModelConfig
    options: ModelOptions = ModelOptions()
    attn: str = "absorbed"
    part: str = "main"

    @nn.compact
    def __call__(self, tokens, positions, cache, layout, valid, h_prev=None, out_index=None):
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
                h, latents[name] = stack(h, None if cache is None else cache[name], cos, sin, layout, valid)
            h = RMSNorm(c.rms_norm_eps, "embed", o, name="norm")(h)
        else:
            mtp = CachedMTPModule(c, o, attn=self.attn, name=self.part)
            h, latents[self.part] = mtp(h_prev, h, None if cache is None else cache[self.part], cos, sin, layout,
                                        valid)
        picked = h if out_index is None else jnp.take_along_axis(h, out_index[..., None], axis=1)
        return (embed.attend(picked) if c.tie_word_embeddings else head(picked)), h, latents


def _write_all(entries: dict, latents: dict, positions: jax.Array) -> dict:
    return {name: kvcache.write(entries[name], *latents[name], positions) for name in entries}


def _cache_len(cache: kvcache.Cache) -> int:
    return jax.tree.leaves(cache["main"])[0].shape[2]


def cache_layout(positions: jax.Array, max_len: int, first_slot: int = 0) -> Layout:
    """Who sees whom when new tokens at consecutive ``positions [B,T]`` attend to a cache of ``max_len`` slots
    followed by themselves: cached slots before the first new token (and from ``first_slot`` on; slots at or
    after the first new token may hold stale values: padding, rejected drafts), then the new tokens causally
    (those at positions >= ``first_slot``). Slot s holds position s."""
    b = positions.shape[0]
    slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
    cached = (slots < positions[:, :1]) & (slots >= first_slot)
    new = positions >= first_slot
    k_index = jnp.concatenate([slots, positions], axis=1)
    k_segment = jnp.concatenate([cached, new], axis=1).astype(jnp.int32)
    return Layout(positions, jnp.ones_like(positions), k_index, k_segment)


def cache_visibility(positions: jax.Array, max_len: int, first_slot: int = 0) -> jax.Array:
    """``[B,T,S+T]``: the keys (S cached slots, then the T new tokens) each new token sees (``cache_layout``)."""
    return visible(cache_layout(positions, max_len, first_slot))


PREFILL_CHUNK = 2048  # prompts longer than this are prefilled in chunks of this many tokens


def prefill_core(params, cache, tokens, lengths, *, config, options, mtp: bool = False,
                 chunk: Optional[int] = PREFILL_CHUNK):
    """Prefill of right-padded prompts ``tokens [B,T]`` with ``lengths [B]``.

    Writes slots 0..T-1 of the main cache (slots past a prompt's length hold padding, never attended to)
    and, with ``mtp``, the first MTP module's cache (its row at position p pairs h_{p-1} with token p).
    Up to ``chunk`` tokens the whole prompt runs the full MLA path at once; a longer prompt (T a multiple of
    ``chunk``) is prefilled ``chunk`` tokens at a time (``lax.scan``), each chunk attending to the cache written
    so far plus itself on the absorbed path, so peak memory follows the chunk, not the prompt.
    Returns ``(cache, logits [B,V] at each prompt's last token, hidden [B,2,D] at its last two positions)``.
    """
    b, t = tokens.shape
    if chunk is not None and t > chunk:
        return _prefill_chunked(params, cache, tokens, lengths, config=config, options=options, mtp=mtp,
                                chunk=chunk)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = (positions < lengths[:, None]).astype(jnp.int32)
    model = CachedTransformer(config, options, attn="full")
    logits, hidden, latents = model.apply(
        {"params": params}, tokens, positions, None, attention_layout(seg), seg > 0,
        out_index=(lengths - 1)[:, None])
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], latents, positions)
    if mtp:
        h_prev = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
        seg_m = seg.at[:, 0].set(0)  # no MTP row at position 0
        _, _, lat = CachedTransformer(config, options, attn="full", part="mtp_0").apply(
            {"params": params}, tokens, positions, None, attention_layout(seg_m), seg_m > 0, h_prev=h_prev,
            out_index=jnp.zeros((b, 1), jnp.int32))
        cache["mtp"] = _write_all(cache["mtp"], lat, positions)
    return cache, logits[:, 0], jnp.take_along_axis(hidden, _last_two(lengths)[..., None], axis=1)


def _last_two(lengths: jax.Array) -> jax.Array:
    """``[B,2]``: each prompt's last two positions (the first twice for a one-token prompt)."""
    return jnp.stack([jnp.maximum(lengths - 2, 0), lengths - 1], axis=1)


def _prefill_chunked(params, cache, tokens, lengths, *, config, options, mtp, chunk):
    b, t = tokens.shape
    if t % chunk:
        raise ValueError(f"a chunked prefill needs a prompt length that is a multiple of the chunk, got {t} "
                         f"and {chunk}")
    n = t // chunk
    wanted = jnp.concatenate([_last_two(lengths), (lengths - 1)[:, None]], axis=1)  # hidden x2, logits

    def one_chunk(carry, c):
        cache, h_last = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens, c * chunk, chunk, axis=1)
        pos = c * chunk + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        cache, logits, hidden = decode_core(params, cache, tok, pos, config=config, options=options,
                                            out_index=jnp.clip(wanted[:, 2:] - c * chunk, 0, chunk - 1))
        if mtp:  # row p pairs h_{p-1} (from the previous chunk for its first row) with token p
            h_prev = jnp.concatenate([h_last, hidden[:, :-1]], axis=1)
            cache, _, _ = mtp_core(params, cache, h_prev, tok, pos, config=config, options=options,
                                   out_index=jnp.zeros((b, 1), jnp.int32))
        h_sel = jnp.take_along_axis(hidden, jnp.clip(wanted[:, :2] - c * chunk, 0, chunk - 1)[..., None], axis=1)
        return (cache, hidden[:, -1:]), (logits[:, 0], h_sel)

    h0 = jnp.zeros((b, 1, config.hidden_size), options.compute_dtype)
    (cache, _), (logits, h_sel) = jax.lax.scan(one_chunk, (cache, h0), jnp.arange(n))
    # Each wanted position is taken from the chunk that holds it.
    owner = wanted // chunk  # [B,3]
    batch = jnp.arange(b)
    h2 = jnp.stack([h_sel[owner[:, i], batch, i] for i in range(2)], axis=1)
    return cache, logits[owner[:, 2], batch], h2


def decode_core(params, cache, tokens, positions, *, config, options, absorb: bool = True, out_index=None):
    """T new tokens per sequence ``tokens [B,T]`` at consecutive ``positions [B,T]`` over the cache.

    Returns ``(cache with their latents written, logits [B,T,V] (or at ``out_index [B,G]`` only), hidden
    [B,T,D])``.
    """
    layout = cache_layout(positions, _cache_len(cache))
    model = CachedTransformer(config, options, attn="absorbed" if absorb else "naive")
    logits, hidden, latents = model.apply({"params": params}, tokens, positions, cache["main"], layout,
                                          jnp.ones(tokens.shape, jnp.bool_), out_index=out_index)
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], latents, positions)
    return cache, logits, hidden


def mtp_core(params, cache, h_prev, tokens, positions, *, config, options, depth: int = 0, out_index=None):
    """MTP module ``depth`` on rows pairing ``h_prev [B,T,D]`` (positions p-1) with ``tokens [B,T]`` (p).

    Returns ``(cache, logits [B,T,V] for the tokens at p+1, hidden [B,T,D])``.
    """
    name = f"mtp_{depth}"
    layout = cache_layout(positions, _cache_len(cache), first_slot=depth + 1)
    model = CachedTransformer(config, options, attn="absorbed", part=name)
    logits, hidden, latents = model.apply({"params": params}, tokens, positions, cache["mtp"], layout,
                                          jnp.ones(tokens.shape, jnp.bool_), h_prev=h_prev, out_index=out_index)
    cache = dict(cache)
    cache["mtp"] = {**cache["mtp"], name: kvcache.write(cache["mtp"][name], *latents[name], positions)}
    return cache, logits, hidden


_STATIC = ("config", "options")
prefill = jax.jit(prefill_core, static_argnames=_STATIC + ("mtp", "chunk"), donate_argnames=("cache",))
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
    return model.apply({"params": params}, tokens, pos, None, attention_layout(seg), seg > 0)[0]


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
    "CachedTransformer", "bucket_length", "cache_layout", "cache_length", "cache_visibility", "decode_all_positions",
    "decode_core", "decode_step", "mtp_core", "mtp_step", "prefill", "prefill_core",
]
