"""Continuous batching: a pool of cache slots that requests join and leave between decode steps.

``Engine`` owns one latent cache of ``slots`` rows of ``max_len`` positions each (``kv_cache.init_cache``), and a
thread that loops:

1. **Admit**: while a slot is free and a request waits, prefill that request alone (its prompt right-padded to a
   bucket, ``steps.prefill_core`` on a one-row cache, chunked past ``PREFILL_CHUNK`` tokens) and copy its row
   into the free slot (the pool donated: no copy of the other rows); its first token is sampled there.
2. **Decode**: a jitted step over every slot, each at its own position (``steps.decode_core`` with per-row
   positions: a row attends to its own filled slots, the rest masked), the cache donated. Attention reads a window
   of the cache, the power of two (from ``window_min``) past the longest running sequence, not the whole row.
   While no request waits for a slot, ``steps_per_call`` steps run in one call (a scan: one host round trip for
   several tokens). Free slots run too (their outputs are dropped): the shapes never change, so the step compiles
   once per (window, steps per call).
3. **Emit**: each running request's new tokens go to its stop rules (EOS, stop strings, ``max_tokens``, through
   ``generation._Sequence``) and its text to the request's callback; a finished or cancelled request frees its
   slot before the next admission.

Sampling is per row (``sample_rows``): each request has its own temperature, top-p and seed, and its key for the
k-th token is ``fold_in(PRNGKey(seed), k)``, so a seeded request gives the same tokens whatever runs beside it.
Greedy requests (temperature 0) take the argmax, as ``generate`` does.

Not done yet (issue 29): the window is the batch's, not each sequence's (no ragged / paged kernel); a long
prompt's prefill pauses the running requests for its whole length (it is chunked, but the chunks are not
interleaved with decode steps); MTP speculative decoding and prefix reuse are not in the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config.model import ModelConfig
from deepseek_jax.config.options import ModelOptions
from deepseek_jax.inference.generation import _Sequence, default_options
from deepseek_jax.inference.sampling import NEG_INF
from deepseek_jax.inference.steps import PREFILL_CHUNK, bucket_length, decode_core, prefill_core
from deepseek_jax.layers import kv_cache


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


class Stopped(Exception):
    """The engine is stopping: it takes no more requests."""


@dataclasses.dataclass
class Request:
    """One generation: ``prompt`` token ids; sampling per request; ``on_event(text, token, logprob, finish)``
    is called from the engine's thread for every token (``text``: the newly printable text) and once more with
    ``finish`` set ("eos", "stop", "length", "cancelled", or "error": ``error`` says what failed)."""

    prompt: Sequence[int]
    max_tokens: int
    on_event: Callable[[str, Optional[int], Optional[float], Optional[str]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    cancelled: bool = False
    # set by the engine
    error: Optional[str] = None
    seq: Optional[_Sequence] = None
    slot: Optional[int] = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_s: Optional[float] = None


def _notify(req: Request, *event) -> bool:
    """``req.on_event(*event)``; False (and the engine goes on) when the listener fails, e.g. its event loop is
    closed."""
    try:
        req.on_event(*event)
        return True
    except Exception:  # noqa: BLE001
        return False


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array):
    """Per-row sampling of ``logits [B,V]``: row i greedy (argmax) where ``temperature[i] == 0``, else drawn with
    ``keys[i]`` from softmax(logits / temperature) restricted to the top-p nucleus (``sampling.processed_logits``'s
    rule: the smallest set of most likely tokens whose mass reaches ``top_p``). Returns ``(tokens [B], logprobs
    [B])``, each log-probability under the distribution its token was drawn from (greedy: the model's)."""
    x = logits.astype(jnp.float32)
    greedy = temperature <= 0
    xs = x / jnp.where(greedy, 1.0, temperature)[:, None]
    probs = jax.nn.softmax(xs, axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    threshold = jnp.min(jnp.where(before < top_p[:, None], sorted_p, jnp.inf), axis=-1, keepdims=True)
    xs = jnp.where((probs < threshold) & (top_p[:, None] < 1.0), NEG_INF, xs)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, xs)
    tokens = jnp.where(greedy, jnp.argmax(x, axis=-1), drawn).astype(jnp.int32)
    dist = jnp.where(greedy[:, None], x, xs)
    logp = jnp.take_along_axis(jax.nn.log_softmax(dist, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logp


def _keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts)


@partial(jax.jit, static_argnames=("config", "options", "window", "k"), donate_argnums=(1,))
def _decode(params, cache, tokens, positions, temperature, top_p, seeds, counts, *, config, options, window, k):
    """``k`` decode steps over every slot in one call (a scan: one host round trip); returns the cache and the
    tokens and log-probabilities ``[k, slots]``. Token j of a row is its ``counts + j``-th (its sampling key)."""
    def one(carry, j):
        cache, tok = carry
        cache, logits, _ = decode_core(params, cache, tok[:, None], (positions + j)[:, None], config=config,
                                       options=options, window=window)
        nxt, logp = sample_rows(logits[:, 0], temperature, top_p, _keys(seeds, counts + j))
        return (cache, nxt), (nxt, logp)

    (cache, _), (toks, logps) = jax.lax.scan(one, (cache, tokens), jnp.arange(k))
    return cache, toks, logps


@partial(jax.jit, static_argnames=("config", "options", "axes"), donate_argnums=(0,))
def _admit(pool, row_cache, params, tokens, length, slot, temperature, top_p, seed, *, config, options, axes):
    """Prefill one prompt into ``row_cache`` (one row), copy that row into ``pool`` at ``slot`` (``axes``: each
    leaf's batch axis, in ``jax.tree.leaves`` order) and sample its first token."""
    row_cache, logits, _ = prefill_core(params, row_cache, tokens, length, config=config, options=options)
    leaves, tree = jax.tree.flatten(pool)
    # the row cut to the pool's length (a prompt chunked past PREFILL_CHUNK is padded to whole chunks, which may
    # run past it: padding only, as the prompt itself fits)
    rows = [jax.lax.slice_in_dim(r, 0, p.shape[2], axis=2) for p, r in zip(leaves, jax.tree.leaves(row_cache))]
    pool = jax.tree.unflatten(tree, [jax.lax.dynamic_update_slice_in_dim(p, r.astype(p.dtype), slot, ax)
                                     for p, r, ax in zip(leaves, rows, axes)])
    tok, logp = sample_rows(logits, temperature, top_p, _keys(seed, jnp.zeros_like(seed)))
    return pool, tok[0], logp[0]


class Engine:
    """Continuous batching over ``slots`` cache rows of ``max_len`` positions (module docstring). ``submit``
    queues a ``Request`` (up to ``max_queue`` waiting, else ``QueueFull``); ``start`` / ``stop`` run the loop in
    a thread. ``eos``: the token ids that end a sequence; ``tokenizer`` decodes the text (stop strings need it)."""

    def __init__(self, config: ModelConfig, params, *, tokenizer=None, eos: Sequence[int] = (), slots: int = 8,
                 max_len: Optional[int] = None, max_queue: int = 64, options: Optional[ModelOptions] = None,
                 cache_dtype: Optional[str] = None, min_bucket: int = 16, window_min: Optional[int] = 128,
                 steps_per_call: int = 4):
        if config.is_v4:
            raise ValueError("the serving engine does not run DeepSeek-V4 yet (its compressed caches have no "
                             "slot pool here)")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots = {slots}, max_queue = {max_queue}: expected >= 1 and >= 0")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.options = default_options() if options is None else options
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self.slots, self.max_queue, self.min_bucket = slots, max_queue, min_bucket
        # the smallest attention window (None: every step reads the whole padded row, as `generate` does)
        self.window_min = window_min or self.max_len
        # decode steps per host round trip while no request waits for a slot (1 when one does, so that it is
        # admitted at the next step)
        self.steps_per_call = max(1, steps_per_call)
        self.eos = frozenset(int(e) for e in eos)
        self.cache_dtype = dtype = cache_dtype or self.options.dtype
        self.cache = kv_cache.init_cache(config, slots, self.max_len, dtype)
        # each leaf's batch axis: where a 2-row and a 1-row cache differ
        two = jax.eval_shape(lambda: kv_cache.init_cache(config, 2, 8, dtype))
        one = jax.eval_shape(lambda: kv_cache.init_cache(config, 1, 8, dtype))
        self._axes = tuple(next(i for i, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b)
                           for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(one)))
        self.running: list[Optional[Request]] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._tok = np.zeros(slots, np.int32)
        self._pos = np.zeros(slots, np.int32)
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.stats = {"steps": 0, "admitted": 0, "finished": 0, "cancelled": 0, "errors": 0, "generated_tokens": 0}

    # ----- requests ------------------------------------------------------------------------------
    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Raise ``ValueError`` (a client's error) when the request cannot run: empty, out of the vocabulary, or
        longer than a slot."""
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"the prompt has token ids outside the model's vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + max(max_tokens, 1) > self.max_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max(max_tokens, 1)}) exceeds the "
                             f"context of {self.max_len} tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens = {max_tokens}: expected >= 1")

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.max_tokens)
        with self._lock:
            if self._stopping:
                raise Stopped("the engine is stopping")
            free = sum(r is None for r in self.running) - len(self.waiting)
            if free <= 0 and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.slots} requests running and {len(self.waiting)} waiting (the limit)")
            request.seq = _Sequence(self.tokenizer, request.stop)
            self.waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (a client gone): it leaves its slot (or the queue) before the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.running)

    # ----- the loop ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="deepseek-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.active:
                    self._lock.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                admit = []
                for slot in range(self.slots):
                    if self.running[slot] is None and self.waiting:
                        req = self.waiting.popleft()
                        req.slot, self.running[slot] = slot, req
                        admit.append(req)
            try:
                for req in admit:
                    self._prefill(req)
                if self.active:
                    self.step()
            except Exception as e:  # noqa: BLE001 -- the requests fail, the engine serves on
                self._fail(e)
        with self._lock:
            for req in list(self.waiting) + [r for r in self.running if r is not None]:
                self._finish(req, "cancelled")

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for slot, req in enumerate(self.running):
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")

    def _fail(self, error: Exception) -> None:
        """A prefill or step failed: every running request ends with finish reason "error" (``Request.error`` says
        why) and the cache pool, which the failed call may have consumed (it is donated), is made again; the
        waiting requests go on."""
        with self._lock:
            for req in [r for r in self.running if r is not None]:
                req.error = f"{type(error).__name__}: {error}"
                self._finish(req, "error")
            self.cache = kv_cache.init_cache(self.config, self.slots, self.max_len, self.cache_dtype)

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot is not None and self.running[req.slot] is req:
            self.running[req.slot] = None
        self.stats["cancelled" if reason == "cancelled" else "errors" if reason == "error" else "finished"] += 1
        _notify(req, "", None, None, reason)

    def _prefill(self, req: Request) -> None:
        n = len(req.prompt)
        t = min(bucket_length(n, self.min_bucket), self.max_len)
        if t > PREFILL_CHUNK:  # chunked: whole chunks (the row cache as long; only max_len slots are kept)
            t = -(-t // PREFILL_CHUNK) * PREFILL_CHUNK
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = req.prompt
        row = kv_cache.init_cache(self.config, 1, max(t, self.max_len), self.cache_dtype)
        self.cache, tok, logp = _admit(
            self.cache, row, self.params, jnp.asarray(tokens), jnp.asarray([n], jnp.int32),
            jnp.asarray(req.slot, jnp.int32), jnp.asarray([req.temperature], jnp.float32),
            jnp.asarray([req.top_p], jnp.float32), jnp.asarray([req.seed], jnp.uint32),
            config=self.config, options=self.options, axes=self._axes)
        self.stats["admitted"] += 1
        self._tok[req.slot], self._pos[req.slot] = int(tok), n
        self._emit(req, int(tok), float(logp))

    def step(self) -> None:
        """Decode steps over every slot (``steps_per_call`` in one call while no request waits and some running
        request wants that many more tokens, else one); each running request gets its next tokens."""
        running = list(self.running)
        live = [r for r in running if r is not None]
        k = self.steps_per_call
        if k > 1 and (self.waiting or max(r.max_tokens - len(r.seq.tokens) for r in live) < k):
            k = 1
        temperature = np.array([r.temperature if r else 0.0 for r in running], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in running], np.float32)
        seeds = np.array([r.seed if r else 0 for r in running], np.uint32)
        counts = np.array([len(r.seq.tokens) if r else 0 for r in running], np.int32)
        # Attention reads the first `window` slots: a power of two past the longest running sequence (one
        # compiled step per window; the whole row when the window would reach it).
        longest = max(int(self._pos[i]) for i, r in enumerate(running) if r is not None) + k
        window = min(self.window_min << max(0, (longest - 1) // self.window_min).bit_length(), self.max_len)
        self.cache, nxt, logp = _decode(self.params, self.cache, jnp.asarray(self._tok), jnp.asarray(self._pos),
                                        jnp.asarray(temperature), jnp.asarray(top_p), jnp.asarray(seeds),
                                        jnp.asarray(counts), config=self.config, options=self.options,
                                        window=None if window >= self.max_len else window, k=k)
        nxt, logp = np.asarray(nxt), np.asarray(logp)
        self.stats["steps"] += k
        for j in range(k):  # a request that finishes at token j drops the rest of its row's tokens
            for slot, req in enumerate(running):
                if req is None or self.running[slot] is not req:
                    continue
                self._tok[slot], self._pos[slot] = nxt[j, slot], self._pos[slot] + 1
                self._emit(req, int(nxt[j, slot]), float(logp[j, slot]))

    def _emit(self, req: Request, token: int, logprob: float) -> None:
        if req.cancelled:
            with self._lock:
                self._finish(req, "cancelled")
            return
        if req.first_token_s is None:
            req.first_token_s = time.perf_counter() - req.submitted
        piece = req.seq.add(token, self.eos, req.max_tokens, logprob)
        self.stats["generated_tokens"] += 1
        if not _notify(req, piece or "", token, logprob, None):
            req.cancelled = True  # its listener is gone: the next step frees the slot
        if req.seq.finished is not None:
            with self._lock:
                self._finish(req, req.seq.finished)
