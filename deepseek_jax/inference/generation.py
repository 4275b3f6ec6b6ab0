"""Batched text generation over the latent KV cache, with optional MTP speculative decoding.

Prompts of different lengths are right-padded to a power-of-two bucket and prefilled together; each
sequence then decodes at its own position (slot = position, so no left padding and no position shifts).
Shapes are fixed per (batch, prompt bucket, cache length): the decode step compiles once per request shape (and
what a step reads, ``steps.decode_reads``: a window past the longest sequence, or, for long rows of different
lengths on one device, the pages each row's own length fills) and is reused across requests of the same shape.
One host round trip per step streams the new tokens, checks stop conditions (EOS ids, stop strings, max new tokens)
and stops when every sequence is done.

Speculative decoding (``speculative=True``, V3/R1 checkpoints with an MTP module): each step the MTP module
drafts one token from the main model's last hidden state, the main model verifies ``[next, draft]`` in one
decode step of two tokens, and the draft is accepted by rejection sampling (``sampling.speculative_accept``),
which keeps the target distribution; greedy output is the same as plain greedy in fp32 (in bf16 the two-token
verify step rounds differently, so a near-tie can go the other way). A step emits 1 or 2 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.data.tokenizer import stop_prefix_len
from deepseek_jax.inference.sampling import (
    SamplingParams,
    logprob_of,
    mark_seen,
    probs_of,
    processed_logits,
    sample,
    sample_with_logprob,
    speculative_accept,
    target_probs,
)
from deepseek_jax.inference.steps import (
    PAGE,
    PREFILL_CHUNK,
    bucket_length,
    cache_length,
    decode_core,
    decode_reads,
    mtp_core,
    pages_supported,
    prefill_core,
)
from deepseek_jax.layers import kv_cache
from deepseek_jax.models.transformer import abstract_params
from deepseek_jax.parallel.mesh import mesh_context
from deepseek_jax.parallel.rules import logical_sharding, param_shardings
from deepseek_jax.quant.weights import with_fp8_shardings

_STATIC = ("config", "options", "sampling")
_DEFAULT = object()


# ----- jitted steps -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("vocab_size",))
def _prompt_seen(tokens: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """``[B,V]`` True for the tokens of each prompt (what the repetition penalty looks at)."""
    valid = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    hit = jnp.zeros((tokens.shape[0], vocab_size), jnp.bool_)
    return hit.at[jnp.arange(tokens.shape[0])[:, None], tokens].max(valid)


def _prefill_sample(params, cache, tokens, lengths, seen, rng, *, config, options, sampling, mtp, chunk):
    cache, logits, h2 = prefill_core(params, cache, tokens, lengths, config=config, options=options, mtp=mtp,
                                     chunk=chunk)
    first, logp = sample_with_logprob(rng, logits, seen, sampling)
    t_prev = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    return cache, first, mark_seen(seen, first), h2, t_prev, logp


def _decode_sample(params, cache, tok, pos, seen, rng, *, config, options, sampling, absorb, window, paged):
    cache, logits, _ = decode_core(params, cache, tok[:, None], pos[:, None], config=config, options=options,
                                   absorb=absorb, window=window, paged=paged)
    nxt, logp = sample_with_logprob(rng, logits[:, 0], seen, sampling)
    return cache, nxt, mark_seen(seen, nxt), logp


def _speculative_step(params, cache, n, t_prev, x, h2, seen, rng, *, config, options, sampling):
    """One draft-verify step. State: ``n [B]`` tokens in the main cache, ``x`` the next token (emitted, not
    yet cached), ``t_prev`` the token before it, ``h2 [B,2,D]`` main hidden states at positions n-2, n-1.

    The MTP rows at positions n-1 and n (pairing h_{p-1} with token p) are (re)computed, the second one
    drafts token n+1; then the main model runs ``[x, draft]`` at positions n, n+1.
    Returns the new state, the emitted tokens ``[B,2]`` (1 or 2 of them valid), ``accepted [B]`` and the
    emitted tokens' log-probabilities ``[B,2]`` under the main model's processed distributions (what they are
    distributed as: ``logprob_of``).
    """
    k_draft, k_accept, k_bonus = jax.random.split(rng, 3)
    pos_m = n[:, None] + jnp.arange(-1, 1, dtype=jnp.int32)
    cache, q_logits, _ = mtp_core(params, cache, h2, jnp.stack([t_prev, x], axis=1), pos_m, config=config,
                                  options=options)
    draft = sample(k_draft, q_logits[:, 1], seen, sampling)
    pos_v = n[:, None] + jnp.arange(2, dtype=jnp.int32)
    cache, p_logits, h = decode_core(params, cache, jnp.stack([x, draft], axis=1), pos_v, config=config,
                                     options=options)
    x0 = processed_logits(p_logits[:, 0], seen, sampling)
    p0 = probs_of(x0, sampling)
    if sampling.greedy:
        first = jnp.argmax(p0, axis=-1).astype(jnp.int32)
        accepted = first == draft
    else:
        q = target_probs(q_logits[:, 1], seen, sampling)
        accepted, first = speculative_accept(k_accept, p0, q, draft)
    bonus, bonus_logp = sample_with_logprob(k_bonus, p_logits[:, 1], mark_seen(seen, draft), sampling)
    seen = mark_seen(mark_seen(seen, first), bonus, where=accepted)
    acc = accepted[:, None]
    state = (
        n + 1 + accepted.astype(jnp.int32),
        jnp.where(accepted, draft, x),
        jnp.where(accepted, bonus, first),
        jnp.where(acc[..., None], h, jnp.stack([h2[:, 1], h[:, 0]], axis=1)),
        seen,
    )
    logp = jnp.stack([logprob_of(x0, first), bonus_logp], axis=1)
    return cache, state, jnp.stack([first, bonus], axis=1), accepted, logp


_prefill_sample_jit = jax.jit(_prefill_sample, static_argnames=_STATIC + ("mtp", "chunk"),
                              donate_argnames=("cache",))
_decode_sample_jit = jax.jit(_decode_sample, static_argnames=_STATIC + ("absorb", "window", "paged"),
                             donate_argnames=("cache",))
_speculative_step_jit = jax.jit(_speculative_step, static_argnames=_STATIC, donate_argnames=("cache",))


def default_options() -> ModelOptions:
    """Inference defaults: bf16 compute (and so a bf16 latent cache) on GPU and TPU, fp32 on CPU (where bf16
    is slower and gives nothing)."""
    return ModelOptions(dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")


# ----- host loop ----------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenEvent:
    """One generated token of sequence ``index``; ``text`` is the newly printable text (with a tokenizer)."""

    index: int
    token: int
    text: Optional[str] = None
    logprob: Optional[float] = None  # under the distribution it was drawn from (``sampling.logprob_of``)


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (an EOS that stopped it included)
    texts: Optional[list[str]]  # decoded, special tokens and stop strings cut (with a tokenizer)
    finish_reasons: list[str]  # "eos", "stop" (a stop string) or "length"
    stats: dict
    # Per generated token, its log-probability under the distribution it was drawn from (temperature, top-k/p
    # and min-p applied: ``sampling.logprob_of``), as the decode computed it (absorbed MLA, the cache's dtype,
    # the two-token verify step under speculation). Greedy: the model's log-probability of its argmax.
    logprobs: Optional[list[list[float]]] = None


class _Sequence:
    """Host-side state of one sequence: its tokens, its text so far, and why it finished."""

    def __init__(self, tokenizer, stop_strings):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""  # decoded, cut at a stop string
        self.finished: Optional[str] = None
        self._emitted = 0  # characters of text already streamed
        self._tokenizer = tokenizer
        self._stops = tuple(stop_strings)

    def add(self, token: int, eos: frozenset, max_new: int, logprob: Optional[float] = None) -> Optional[str]:
        """Append a token; return the text it makes printable (or None) and set ``finished`` when done.

        Text that could still become a stop string, or an incomplete UTF-8 sequence, is held back until
        it can no longer be cut.
        """
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in eos:
            self.finished = "eos"
        complete = True
        if self._tokenizer is not None and self.finished is None:
            full = self._tokenizer.decode(self.tokens, skip_special_tokens=True)
            complete = not full.endswith("\ufffd")
            if complete:
                longest = max((len(s) for s in self._stops), default=0)
                for stop in self._stops:
                    cut = full.find(stop, max(0, len(self.text) - longest))
                    if cut >= 0:
                        full, self.finished = full[:cut], "stop"
                        break
                self.text = full
        if self.finished is None and len(self.tokens) >= max_new:
            self.finished = "length"
        if self.finished in ("length", "eos") and not complete:
            self.text = full  # never completed: show the replacement characters
        if self._tokenizer is None:
            return None
        end = len(self.text)
        if self.finished is None:
            if not complete:
                return None
            end -= stop_prefix_len(self.text, self._stops)
        piece, self._emitted = self.text[self._emitted:end], max(self._emitted, end)
        return piece


def _eos_set(config: ModelConfig, eos_token_id) -> frozenset:
    if eos_token_id is _DEFAULT:
        eos_token_id = config.eos_token_id
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


def place_params(config: ModelConfig, params, mesh):
    """``params`` on ``mesh`` by the training rules (FP8-kept kernels on their block-aligned shardings); arrays
    already placed so stay where they are."""
    return jax.device_put(params, with_fp8_shardings(param_shardings(abstract_params(config), mesh), params))


def _shard_for(config: ModelConfig, mesh, params, cache, tokens, lengths, seen):
    params = place_params(config, params, mesh)
    cache = jax.device_put(cache, kv_cache.cache_shardings(cache, mesh))
    batch = lambda x: jax.device_put(x, logical_sharding(["act_batch"] + [None] * (np.ndim(x) - 1),  # noqa: E731
                                                         np.shape(x), mesh))
    return params, cache, batch(tokens), batch(lengths), batch(seen)


def _check_request(config: ModelConfig, max_new_tokens: int, prefill_chunk, speculative: bool, stop_strings,
                   tokenizer) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected >= 1")
    if prefill_chunk is not None and (prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1)):
        raise ValueError(f"prefill_chunk = {prefill_chunk}: expected a power of two (or None)")
    if speculative and config.is_v4:
        raise ValueError("speculative decoding needs an MTP module; DeepSeek-V4's is not built here (its "
                         "checkpoint's MTP tensors are skipped on load): decode without --speculative")
    if speculative and config.num_nextn_predict_layers < 1:
        raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1); this "
                         f"{config.model_type} config has none (or the checkpoint carried no MTP weights)")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")


def _prompt_ids(prompts, tokenizer, vocab_size: int) -> list[list[int]]:
    """Each prompt as token ids (text encoded with ``tokenizer``), checked against the vocabulary."""
    ids = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (or pass token ids)")
            p = tokenizer.encode(p)
        if len(p) == 0:
            raise ValueError("empty prompt: give at least one token (e.g. BOS)")
        p = [int(t) for t in p]
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {len(ids)}: token id {max(p) if max(p) >= 0 else min(p)} is outside the "
                             f"model's vocabulary [0, {vocab_size})")
        ids.append(p)
    return ids


def _finish_stats(st: dict, seqs, t_decode: float, first_step: Optional[tuple[float, int]], speculative: bool,
                  texts: bool) -> None:
    """The decode's rates and the sequences' results into ``st``. ``first_step``: the time and the tokens
    generated when the first decode step ended (it may include compilation: rates are taken over the rest)."""
    t_end = time.perf_counter()
    st["decode_s"] = t_end - t_decode
    st["generated_tokens"] = sum(len(s.tokens) for s in seqs)
    # The first decode step compiles on a first call: its time is reported apart, the rate is over the rest.
    st["decode_first_step_s"] = (first_step[0] if first_step is not None else t_end) - t_decode
    if first_step is not None and st["steps"] > 1:
        st["decode_steady_tokens"] = st["generated_tokens"] - first_step[1]
        st["decode_steady_s"] = t_end - first_step[0]
        st["decode_tokens_per_s"] = st["decode_steady_tokens"] / st["decode_steady_s"]
    else:
        st["decode_steady_tokens"], st["decode_steady_s"] = 0, 0.0
        st["decode_tokens_per_s"] = float("nan")
    st["prefill_tokens_per_s"] = st["prompt_tokens"] / st["prefill_s"]
    if speculative:
        st["acceptance_rate"] = st["accepted"] / max(st["drafted"], 1)
    st["tokens"] = [s.tokens for s in seqs]
    st["logprobs"] = [s.logprobs for s in seqs]
    st["texts"] = [s.text for s in seqs] if texts else None
    st["finish_reasons"] = [s.finished for s in seqs]


def stream(
    config: ModelConfig,
    params,
    prompts: Sequence[Union[str, Sequence[int]]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    eos_token_id=_DEFAULT,
    stop_strings: Iterable[str] = (),
    tokenizer=None,
    speculative: bool = False,
    cache_dtype: Optional[str] = None,
    options: Optional[ModelOptions] = None,
    absorb: bool = True,
    min_bucket: int = 16,
    stats: Optional[dict] = None,
    mesh=None,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
) -> Iterator[TokenEvent]:
    """Yield ``TokenEvent``s as tokens are generated (see ``generate`` for the arguments).

    ``stats``, if given, is filled with timings and counts when the generator finishes.
    """
    options = default_options() if options is None else options
    cache_dtype = cache_dtype or options.dtype
    stop_strings = tuple(stop_strings)
    _check_request(config, max_new_tokens, prefill_chunk, speculative, stop_strings, tokenizer)
    ids = _prompt_ids(prompts, tokenizer, config.vocab_size)
    eos = _eos_set(config, eos_token_id)
    b = len(ids)
    lengths = np.array([len(p) for p in ids], np.int32)
    t_pad = bucket_length(int(lengths.max()), min_bucket)
    s_max = cache_length(t_pad, max_new_tokens, extra=2 if speculative else 0)
    if s_max > config.max_position_embeddings:
        raise ValueError(f"prompt bucket {t_pad} + {max_new_tokens} new tokens exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    tokens = np.zeros((b, t_pad), np.int32)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = p

    statics = dict(config=config, options=options, sampling=sampling)
    rng = jax.random.PRNGKey(seed)
    cache = kv_cache.init_cache(config, b, s_max, cache_dtype, mtp=speculative)
    if sampling.repetition_penalty != 1.0:
        seen = _prompt_seen(jnp.asarray(tokens), jnp.asarray(lengths), config.vocab_size)
    else:
        seen = jnp.zeros((b, config.vocab_size), jnp.bool_)
    if mesh is not None:
        # Sharded prefill and decode: params by the logical rules, cache and per-sequence state over the batch
        # axes; the jitted steps follow their inputs' shardings (and keep donating the cache).
        params, cache, tokens, lengths, seen = _shard_for(config, mesh, params, cache, tokens, lengths, seen)
    seqs = [_Sequence(tokenizer, stop_strings) for _ in range(b)]
    st = {"batch": b, "prompt_tokens": int(lengths.sum()), "prompt_bucket": t_pad, "cache_slots": s_max,
          "cache_bytes": kv_cache.cache_nbytes(cache), "steps": 0, "drafted": 0, "accepted": 0}

    t0 = time.perf_counter()
    rng, key = jax.random.split(rng)
    with mesh_context(mesh):
        cache, tok, seen, h2, t_prev, logp = _prefill_sample_jit(
            params, cache, jnp.asarray(tokens), jnp.asarray(lengths), seen, key, mtp=speculative,
            chunk=prefill_chunk, **statics)
    first, first_logp = np.asarray(tok), np.asarray(logp)
    st["prefill_s"] = time.perf_counter() - t0
    for i in range(b):
        yield from _emit(seqs, i, [int(first[i])], [float(first_logp[i])], eos, max_new_tokens)

    t1, first_step = time.perf_counter(), None
    pos = jnp.asarray(lengths)
    n, x = pos, tok
    host_pos = np.array([len(p) for p in ids])  # the next decode step's positions
    # ragged decode (each row reads its own pages) where it pays, on one device; else a window past the longest row
    page = PAGE if absorb and mesh is None and pages_supported(config) else None
    while not all(s.finished for s in seqs):
        rng, key = jax.random.split(rng)
        active = [s.finished is None for s in seqs]
        if speculative:
            with mesh_context(mesh):
                cache, (n, t_prev, x, h2, seen), out, accepted, logp = _speculative_step_jit(
                    params, cache, n, t_prev, x, h2, seen, key, **statics)
            out, accepted, logp = np.asarray(out), np.asarray(accepted), np.asarray(logp)
            st["drafted"] += sum(active)
            st["accepted"] += int(sum(bool(a) and act for a, act in zip(accepted, active)))
            emitted = [2 if accepted[i] else 1 for i in range(b)]
            new = [[int(t) for t in out[i, :m]] for i, m in enumerate(emitted)]
            new_logp = [[float(v) for v in logp[i, :m]] for i, m in enumerate(emitted)]
        else:
            # attention reads each row's pages, or a window past the longest row (V4 reads its rings)
            reads = dict(window=None, paged=None) if config.is_v4 else decode_reads(host_pos, 1, s_max, page)
            with mesh_context(mesh):
                cache, tok, seen, logp = _decode_sample_jit(params, cache, tok, pos, seen, key, absorb=absorb,
                                                            **reads, **statics)
            pos, host_pos = pos + 1, host_pos + 1
            new = [[int(t)] for t in np.asarray(tok)]
            new_logp = [[float(v)] for v in np.asarray(logp)]
        st["steps"] += 1
        for i in range(b):
            if active[i]:
                yield from _emit(seqs, i, new[i], new_logp[i], eos, max_new_tokens)
        if st["steps"] == 1:  # the first step may include compilation: rates are taken over the rest
            first_step = (time.perf_counter(), sum(len(s.tokens) for s in seqs))
    _finish_stats(st, seqs, t1, first_step, speculative, tokenizer is not None)
    if stats is not None:
        stats.update(st)


def _emit(seqs, i, toks, logps, eos, max_new) -> Iterator[TokenEvent]:
    s = seqs[i]
    for t, lp in zip(toks, logps):
        if s.finished is not None:
            return
        piece = s.add(t, eos, max_new, lp)
        yield TokenEvent(i, t, piece, lp)


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Union[str, Sequence[int]]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    eos_token_id=_DEFAULT,
    stop_strings: Iterable[str] = (),
    tokenizer=None,
    on_token: Optional[Callable[[TokenEvent], None]] = None,
    speculative: bool = False,
    cache_dtype: Optional[str] = None,
    options: Optional[ModelOptions] = None,
    absorb: bool = True,
    min_bucket: int = 16,
    mesh=None,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
) -> GenerationResult:
    """Generate continuations of a batch of prompts.

    prompts: token-id lists, or strings (encoded with ``tokenizer``, which adds BOS).
    max_new_tokens: per sequence. sampling: ``SamplingParams`` (default greedy). seed: for sampling.
    eos_token_id: an id, a list of ids or None (default ``config.eos_token_id``); the EOS is kept in
        ``tokens`` and dropped from ``texts``. stop_strings: end a sequence when its text contains one.
    on_token: called with each ``TokenEvent`` as it is generated (streaming); ``stream`` is the iterator form.
    speculative: draft with the MTP module and verify with the main model (V3/R1).
    options: how to run the model (default ``default_options()``: bf16 compute on accelerators, fp32 on CPU).
    cache_dtype: "float32", "bfloat16" or "fp8" (e4m3 with a per-token scale); default the compute dtype.
    absorb: decode with the absorbed MLA path (False: expand the cache every step; for comparison).
    mesh: a ``jax.sharding.Mesh`` (``deepseek_jax.parallel.mesh.make_mesh``): params sharded by the logical rules,
        the cache and per-sequence state over the batch axes; the jitted prefill and decode steps run sharded.
    prefill_chunk: prompts longer than this many tokens (a power of two) are prefilled this many at a time,
        each chunk attending to the cache so far (None: the whole prompt at once).
    The result's ``logprobs`` hold each generated token's log-probability as the sampler drew it (see
    ``GenerationResult``).
    """
    stats: dict = {}
    for event in stream(config, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                        eos_token_id=eos_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
                        speculative=speculative, cache_dtype=cache_dtype, options=options, absorb=absorb,
                        min_bucket=min_bucket, stats=stats, mesh=mesh, prefill_chunk=prefill_chunk):
        if on_token is not None:
            on_token(event)
    tokens, texts, reasons = stats.pop("tokens"), stats.pop("texts"), stats.pop("finish_reasons")
    return GenerationResult(tokens, texts, reasons, stats, stats.pop("logprobs"))
