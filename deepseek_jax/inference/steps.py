"""Prefill and decode steps over the KV cache (``layers/kv_cache.py``): ``Transformer`` in its "prefill" and
"decode" modes, on the training params as they are.

Prefill runs the full MLA path over right-padded prompts and fills the cache; decode runs the absorbed path
(docs/reference.md, section 1) for T new tokens per sequence at per-sequence positions. A dense R1-Distill
student runs the same steps over a cache of its rotated keys and values (``layers/gqa.py``; the absorbed and the
expanded decode are the same for it).

A decode step reads the cache in one of three ways: whole (the padded reference), a window of its first slots
past the longest sequence (``window``), or ragged (``paged``): each row the pages its own length fills, as one
flat work list (``layers/attention/paged.py``), which ``generate`` and the serving engine use on one device.

DeepSeek-V4 runs the same steps over its compressed cache (``kv_cache.write_v4``): its prefill is always the whole
prompt (its attention is blockwise; no chunks), and it has no MTP step.

The jitted entry points donate the cache. On several devices, ``inference/generation.py``'s ``generate(mesh=...)``
places the params by the training rules and the cache over the batch axes; these steps follow their inputs' shardings.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from deepseek_jax.config.options import ModelOptions
from deepseek_jax.layers import kv_cache
from deepseek_jax.layers.attention.layout import attention_layout, cache_layout, paged_layout, pages_needed
from deepseek_jax.models.transformer import Transformer


def _write_all(entries: dict, new: dict, positions: jax.Array, config, valid: Optional[jax.Array] = None) -> dict:
    """The main cache's runs with the new tokens' values written (``valid [B,T]``: V4 writes only those tokens;
    the slot-per-position caches of V3 and the students take padding at slots nothing reads)."""
    if not config.is_v4:
        return {name: kv_cache.write(entries[name], new[name], positions) for name in entries}
    valid = jnp.ones(positions.shape, bool) if valid is None else valid
    return {name: kv_cache.write_v4(entries[name], new[name], positions, valid,
                                    config.compress_rate(config.layer_types[first]))
            for name, first, _ in config.layer_runs}


def _cache_len(cache: kv_cache.Cache) -> int:
    return _slots(cache["main"])


def _slots(main: dict) -> int:
    return jax.tree.leaves(main)[0].shape[kv_cache.SLOT_AXIS]


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
    if chunk is not None and t > chunk and not config.is_v4:  # V4's prefill is blockwise over the whole prompt
        return _prefill_chunked(params, cache, tokens, lengths, config=config, options=options, mtp=mtp,
                                chunk=chunk)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = (positions < lengths[:, None]).astype(jnp.int32)
    model = Transformer(config, options, mode="prefill")
    logits, hidden, new = model.apply({"params": params}, tokens, positions, layout=attention_layout(seg),
                                      out_index=(lengths - 1)[:, None])
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], new, positions, config, seg > 0)
    if mtp:
        h_prev = jnp.concatenate([jnp.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
        seg_m = seg.at[:, 0].set(0)  # no MTP row at position 0
        _, _, new = Transformer(config, options, mode="prefill", part="mtp_0").apply(
            {"params": params}, tokens, positions, layout=attention_layout(seg_m), h_prev=h_prev,
            out_index=jnp.zeros((b, 1), jnp.int32))
        cache["mtp"] = _write_all(cache["mtp"], new, positions, config)
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


def decode_core(params, cache, tokens, positions, *, config, options, absorb: bool = True, out_index=None,
                window: Optional[int] = None, paged: Optional[tuple[int, int]] = None):
    """T new tokens per sequence ``tokens [B,T]`` at consecutive ``positions [B,T]`` over the cache.

    Returns ``(cache with their entries written, logits [B,T,V] (or at ``out_index [B,G]`` only), hidden
    [B,T,D])``. ``absorb``: MLA's absorbed path (False: the cache expanded to per-head keys, for comparison).
    ``window``: attend over the cache's first ``window`` slots only (``kv_cache.window``; every position must be
    below it): a step over short sequences in a long cache reads what they filled, not the whole padded cache;
    the new entries are still written into the whole cache (in place when it is donated). Not for V4.
    ``paged``: ``(page, items)``, a ragged step instead (``layers/attention/paged.py``): each row reads the pages
    of ``page`` slots its own length fills, ``items`` pages in all (``decode_pages``: at least the rows' pages
    at these positions); the absorbed path, for the configs ``pages_supported`` names. Overrides ``window``.
    """
    model = Transformer(config, options, mode="decode", absorb=absorb)
    main = cache["main"]
    if config.is_v4:  # its layers read the new tokens' positions; the cache's rings and pools say the rest
        layout = attention_layout(jnp.ones_like(positions), positions)
    elif paged is not None:
        if not pages_supported(config):
            raise ValueError("paged decode covers MLA without V3.2's indexer, and the GQA students")
        layout = paged_layout(positions, paged[1], paged[0])
        main = kv_cache.pages(main, layout.item_row, layout.item_slots)  # each layer's cache: [N,G,...]
    else:
        if window is not None and window < _cache_len(cache):
            main = kv_cache.window(main, window)
        layout = cache_layout(positions, _slots(main))
    logits, hidden, new = model.apply({"params": params}, tokens, positions, cache=main, layout=layout,
                                      out_index=out_index)
    cache = dict(cache)
    cache["main"] = _write_all(cache["main"], new, positions, config)
    return cache, logits, hidden


def mtp_core(params, cache, h_prev, tokens, positions, *, config, options, depth: int = 0, out_index=None):
    """MTP module ``depth`` on rows pairing ``h_prev [B,T,D]`` (positions p-1) with ``tokens [B,T]`` (p).

    Returns ``(cache, logits [B,T,V] for the tokens at p+1, hidden [B,T,D])``.
    """
    name = f"mtp_{depth}"
    layout = cache_layout(positions, _cache_len(cache), first_slot=depth + 1)
    model = Transformer(config, options, mode="decode", part=name)
    logits, hidden, new = model.apply({"params": params}, tokens, positions, cache=cache["mtp"], layout=layout,
                                      h_prev=h_prev, out_index=out_index)
    cache = dict(cache)
    cache["mtp"] = {**cache["mtp"], name: kv_cache.write(cache["mtp"][name], new[name], positions)}
    return cache, logits, hidden


_STATIC = ("config", "options")
prefill = jax.jit(prefill_core, static_argnames=_STATIC + ("mtp", "chunk"), donate_argnames=("cache",))
decode_step = jax.jit(decode_core, static_argnames=_STATIC + ("absorb", "window", "paged"), donate_argnames=("cache",))
mtp_step = jax.jit(mtp_core, static_argnames=_STATIC + ("depth",), donate_argnames=("cache",))


def decode_window(needed: int, length: int, minimum: int = 128) -> Optional[int]:
    """The cache slots a decode step reads (``decode_core``'s ``window``) when every position is below ``needed``:
    the power of two from ``minimum`` that covers it (one compiled step per window, a handful over a long
    generation), or None (the whole cache of ``length`` slots) when it would reach that."""
    window = minimum << max(0, (needed - 1) // minimum).bit_length()
    return None if window >= length else window


PAGE = 64  # slots per page of a ragged decode step (bench/decode_paged.py)


def pages_supported(config) -> bool:
    """Whether ``decode_core(paged=...)`` serves ``config``: V2 / V3 / R1's MLA and the dense students (V3.2
    selects its keys by the indexer over the whole cache, V4 reads its rings and pools)."""
    return not (config.is_v4 or config.has_indexer)


def decode_pages(lengths, page: int, ahead: int = 1) -> tuple[int, int]:
    """``decode_core``'s ``paged`` for rows whose cached ``lengths`` grow by up to ``ahead`` over the call (a
    row of length 0, a free slot that does not advance, reads nothing): ``(page, items)``, items the rows'
    pages rounded up to 4, 5, 6 or 7 times a power of two (at most 25% of items read nothing, and a growing
    batch compiles a handful of steps per doubling)."""
    need = max(1, pages_needed([int(n) + ahead if n else 0 for n in lengths], page))
    scale = 1 << max(0, need.bit_length() - 3)
    return page, -(-need // scale) * scale


PAGED_FROM = 512  # below this window a step reads the window: one compile per window, and as cheap on CPU
PAGED_READS = 0.75  # pages are read instead when they cover at most this share of the batch's window


def decode_reads(lengths, ahead: int, length: int, page: Optional[int] = PAGE, minimum: int = 128) -> dict:
    """How a decode call over rows of cached ``lengths`` (growing by up to ``ahead``) in a cache of ``length``
    slots reads it: ``decode_core``'s ``window`` and ``paged`` arguments. Ragged pages of ``page`` slots when the
    window would be long (``PAGED_FROM``) and the rows' pages cover at most ``PAGED_READS`` of batch x window
    (lengths that differ: a short row beside a long one); otherwise the window past the longest row, which
    costs a compile per power of two only (the page count changes more often) and, where every row is about
    as long, reads as much (bench/decode_paged.py). ``page=None``: the window always."""
    lengths = [int(n) for n in lengths]
    window = decode_window(max(lengths) + ahead, length, minimum)
    if page:
        span = window or length
        paged = decode_pages(lengths, page, ahead)
        if span >= PAGED_FROM and paged[1] * page <= PAGED_READS * span * len(lengths):
            return {"window": None, "paged": paged}
    return {"window": window, "paged": None}


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
    model = Transformer(config, options, mode="prefill")
    return model.apply({"params": params}, tokens, pos, layout=attention_layout(seg))[0]


def decode_all_positions(params, tokens, *, config, options=ModelOptions(), cache_dtype="float32",
                         absorb: bool = True, prefill_len: int = 1):
    """Logits ``[B,T,V]`` of ``tokens [B,T]``: prefill ``prefill_len`` tokens, then decode one at a time.

    A reference-shaped helper (tests, benchmarks): every position after the prefill comes from the
    cached decode path, so it must match ``Transformer``'s full forward.
    """
    b, t = tokens.shape
    cache = kv_cache.init_cache(config, b, cache_length(prefill_len, t), cache_dtype)
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
    "bucket_length", "cache_length", "decode_all_positions", "decode_core", "decode_pages", "decode_reads",
    "decode_step", "decode_window", "mtp_core", "mtp_step", "pages_supported", "prefill", "prefill_core",
]
