"""Continuous batching: a pool of cache slots that requests join and leave between decode steps.

``Engine`` owns one latent cache of ``slots`` rows of ``max_len`` positions each (``kv_cache.init_cache``), and a
thread that loops (``run_once``):

1. **Admit**: while a slot is free and a request waits, take it. A prompt of up to ``prefill_chunk`` tokens is
   prefilled alone, whole (right-padded to a bucket, ``steps.prefill_core`` on a one-row cache), and its row is
   copied into the free slot (the pool donated: no copy of the other rows); its first token is sampled there.
   A longer prompt starts *filling*: its own one-row cache takes one ``prefill_chunk`` of it per loop turn (the
   absorbed path over what the earlier chunks wrote), so the running requests keep decoding between its chunks;
   after the last chunk the row goes into the slot. One prompt fills at a time, and the queue keeps its order.
   The rows of recent long prompts are kept (``prefix_cache``): a prompt that begins with whole chunks of one
   (a shared system prompt, a conversation's earlier turns) starts filling after them.
2. **Decode**: a jitted step over every slot, each at its own position (``steps.decode_core``), the cache
   donated. It reads (``steps.decode_reads``) a window of the cache, the power of two (from ``window_min``) past
   the longest running sequence; or, when that window is long and the rows' lengths differ (a short request
   beside a long one), ragged pages (``page``): each row the pages of ``page`` slots its own length fills, all
   rows' pages one flat work list (``layers/attention/paged.py``), rounded up to 4-7 x a power of two items.
   Pages are not read on a mesh, for V3.2, or with ``page=None``. While no request waits for a slot or fills,
   ``steps_per_call`` steps run in one call (a scan: one host round trip for several tokens). Free slots run
   too, at position 0 (their outputs are dropped, and they read nothing): the shapes never change.
3. **Emit**: each running request's new tokens go to its stop rules (EOS, stop strings, ``max_tokens``, through
   ``generation._Sequence``) and its text to the request's callback; a finished or cancelled request frees its
   slot before the next admission.

Sampling is per row (``sample_rows``): each request has its own temperature, top-p and seed, and its key for the
k-th token is ``fold_in(PRNGKey(seed), k)``, so a seeded request gives the same tokens whatever runs beside it.
Greedy requests (temperature 0) take the argmax, as ``generate`` does.

With ``speculative``, each step drafts a token per slot with the MTP module and verifies it in the same step
(``_decode_speculative``): a request gains 1 or 2 tokens a step, by rejection sampling with its own key.

Not done yet (issue 29): the pool is slots of ``max_len`` positions (pages are how a step reads them, not how
memory is handed out: a short request still holds a whole slot); prefixes are reused in whole prefill chunks
only, from the rows of recent long prompts (not from the pool's rows, and not for prompts within one chunk);
DeepSeek-V4's caches have no slot pool; one process only (on a mesh, ``mesh``, the pool's slots split over the
batch axes, and the step reads a window).
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
from deepseek_jax.inference.generation import _Sequence, default_options, place_params
from deepseek_jax.inference.sampling import NEG_INF, logprob_of, outside_top_p, speculative_accept
from deepseek_jax.inference.steps import (
    PAGE,
    bucket_length,
    decode_core,
    decode_reads,
    decode_window,
    mtp_core,
    pages_supported,
    prefill_core,
)
from deepseek_jax.layers import kv_cache
from deepseek_jax.parallel.mesh import mesh_context


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


def _row_dists(logits: jax.Array, temperature: jax.Array, top_p: jax.Array):
    """Per row, the fp32 logits of the distribution ``sample_rows`` draws from (greedy rows: the model's own) and
    whether the row is greedy."""
    x = logits.astype(jnp.float32)
    greedy = temperature <= 0
    xs = x / jnp.where(greedy, 1.0, temperature)[:, None]
    # (the nucleus sorts the vocabulary: only when some sampled row asks for it)
    xs = jax.lax.cond(jnp.any((top_p < 1.0) & ~greedy),
                      lambda v: jnp.where(outside_top_p(v, top_p) & (top_p[:, None] < 1.0), NEG_INF, v),
                      lambda v: v, xs)
    return jnp.where(greedy[:, None], x, xs), greedy


def _row_probs(dist: jax.Array, greedy: jax.Array) -> jax.Array:
    """The probabilities a row's token is drawn with: one-hot on the argmax for greedy rows."""
    one_hot = jax.nn.one_hot(jnp.argmax(dist, axis=-1), dist.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy[:, None], one_hot, jax.nn.softmax(dist, axis=-1))


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array):
    """Per-row sampling of ``logits [B,V]``: row i greedy (argmax) where ``temperature[i] == 0``, else drawn with
    ``keys[i]`` from softmax(logits / temperature) restricted to the top-p nucleus (``sampling.outside_top_p``).
    Returns ``(tokens [B], logprobs [B])``, each log-probability under the distribution its token was drawn from
    (greedy: the model's)."""
    dist, greedy = _row_dists(logits, temperature, top_p)
    best = jnp.argmax(dist, axis=-1).astype(jnp.int32)
    # (the draws' random bits only when some row samples)
    tokens = jax.lax.cond(jnp.all(greedy), lambda: best, lambda: jnp.where(
        greedy, best, jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, dist).astype(jnp.int32)))
    return tokens, logprob_of(dist, tokens)


def _keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts)


@partial(jax.jit, static_argnames=("config", "options", "window", "paged", "k"), donate_argnums=(1,))
def _decode(params, cache, tokens, positions, temperature, top_p, seeds, counts, *, config, options, window, paged,
            k):
    """``k`` decode steps over every slot in one call (a scan: one host round trip); returns the cache and the
    tokens and log-probabilities ``[k, slots]``. Token j of a row is its ``counts + j``-th (its sampling key)."""
    live = (positions > 0).astype(positions.dtype)  # a free slot (position 0) stays there: it reads nothing

    def one(carry, j):
        cache, tok = carry
        cache, logits, _ = decode_core(params, cache, tok[:, None], (positions + j * live)[:, None], config=config,
                                       options=options, window=window, paged=paged)
        nxt, logp = sample_rows(logits[:, 0], temperature, top_p, _keys(seeds, counts + j))
        return (cache, nxt), (nxt, logp)

    (cache, _), (toks, logps) = jax.lax.scan(one, (cache, tokens), jnp.arange(k))
    return cache, toks, logps


@partial(jax.jit, static_argnames=("config", "options", "window", "paged", "k"), donate_argnums=(1,))
def _decode_speculative(params, cache, x, n, t_prev, h2, temperature, top_p, seeds, counts, *, config, options,
                        window, paged, k):
    """``k`` draft-verify steps over every slot in one call (``generation._speculative_step``'s, with each row's
    own sampling). Per row: ``n`` tokens cached, ``x`` the next (emitted, not cached), ``t_prev`` the one before
    it, ``h2 [B,2,D]`` the main model's hidden states at positions n-2, n-1. The MTP module drafts token n+1, the
    main model verifies ``[x, draft]`` at n, n+1, and the draft is accepted by rejection sampling
    (``sampling.speculative_accept``, per row with the row's key: greedy rows keep it iff it is the argmax).
    Returns the cache, the state after the k steps, and per step the emitted tokens and their log-probabilities
    ``[k, slots, 2]`` and ``accepted [k, slots]`` (the second token is emitted where accepted)."""
    def one(carry, _):
        cache, x, n, t_prev, h2, counts = carry
        keys = jax.vmap(lambda key: jax.random.split(key, 3))(_keys(seeds, counts))
        cache, q_logits, _ = mtp_core(params, cache, h2, jnp.stack([t_prev, x], axis=1),
                                      n[:, None] + jnp.arange(-1, 1, dtype=jnp.int32), config=config,
                                      options=options)
        draft, _ = sample_rows(q_logits[:, 1], temperature, top_p, keys[:, 0])
        cache, p_logits, h = decode_core(params, cache, jnp.stack([x, draft], axis=1),
                                         n[:, None] + jnp.arange(2, dtype=jnp.int32), config=config,
                                         options=options, window=window, paged=paged)
        p_dist, greedy = _row_dists(p_logits[:, 0], temperature, top_p)
        q_dist, _ = _row_dists(q_logits[:, 1], temperature, top_p)
        accepted, first = jax.vmap(lambda key, p, q, d: speculative_accept(key, p[None], q[None], d[None]))(
            keys[:, 1], _row_probs(p_dist, greedy), _row_probs(q_dist, greedy), draft)
        accepted, first = accepted[:, 0], first[:, 0]
        bonus, bonus_logp = sample_rows(p_logits[:, 1], temperature, top_p, keys[:, 2])
        step = (1 + accepted.astype(jnp.int32)) * (n > 0)  # a free slot (n = 0) stays there: it reads nothing
        carry = (cache, jnp.where(accepted, bonus, first), n + step, jnp.where(accepted, draft, x),
                 jnp.where(accepted[:, None, None], h, jnp.stack([h2[:, 1], h[:, 0]], axis=1)), counts + step)
        return carry, (jnp.stack([first, bonus], axis=1),
                       jnp.stack([logprob_of(p_dist, first), bonus_logp], axis=1), accepted)

    (cache, x, n, t_prev, h2, _), (toks, logps, accepted) = jax.lax.scan(
        one, (cache, x, n, t_prev, h2, counts), None, length=k)
    return cache, (x, n, t_prev, h2), toks, logps, accepted


def _place(pool, row_cache, slot, logits, temperature, top_p, seed):
    """Copy the one-row ``row_cache`` into ``pool`` at ``slot`` (cut to the pool's slots: a row prefilled in
    whole chunks may run past them, with padding only) and sample the request's first token from ``logits``."""
    def put(part):
        batch_axis, slot_axis = kv_cache.AXES[part]
        return jax.tree.map(lambda p, r: jax.lax.dynamic_update_slice_in_dim(
            p, jax.lax.slice_in_dim(r, 0, p.shape[slot_axis], axis=slot_axis).astype(p.dtype), slot, batch_axis),
            pool[part], row_cache[part])

    pool = {part: put(part) for part in pool}
    tok, logp = sample_rows(logits, temperature, top_p, _keys(seed, jnp.zeros_like(seed)))
    return pool, tok[0], logp[0]


@partial(jax.jit, static_argnames=("config", "options", "mtp"), donate_argnums=(0,))
def _admit(pool, row_cache, params, tokens, length, slot, temperature, top_p, seed, *, config, options, mtp):
    """Prefill a whole prompt into ``row_cache`` (one row, the full MLA path; ``mtp``: the MTP cache too), place
    it in ``pool`` at ``slot`` and sample its first token; also returns the hidden states ``[1,2,D]`` at the
    prompt's last two positions (what speculation drafts from)."""
    row_cache, logits, h2 = prefill_core(params, row_cache, tokens, length, config=config, options=options,
                                         chunk=None, mtp=mtp)
    return (*_place(pool, row_cache, slot, logits, temperature, top_p, seed), h2)


@partial(jax.jit, static_argnames=("config", "options", "window", "mtp"), donate_argnums=(0,))
def _fill(row_cache, params, tokens, start, last, h_last, *, config, options, window, mtp):
    """One chunk of a long prompt, ``tokens [1,C]`` at positions ``start..start+C-1``, into ``row_cache``: it
    attends to what the earlier chunks wrote plus itself (the absorbed path, over the first ``window`` slots);
    ``mtp``: the MTP module's rows too (row p pairs h_{p-1}, from ``h_last [1,1,D]`` for the chunk's first, with
    token p). Returns the row, the logits ``[1,V]`` at chunk index ``last`` (the prompt's last token, in its last
    chunk), the hidden states ``[1,2,D]`` at ``last - 1`` and ``last``, and the chunk's last hidden state."""
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    row_cache, logits, hidden = decode_core(params, row_cache, tokens, positions, config=config, options=options,
                                            out_index=jnp.reshape(last, (1, 1)), window=window)
    if mtp:
        row_cache, _, _ = mtp_core(params, row_cache, jnp.concatenate([h_last, hidden[:, :-1]], axis=1), tokens,
                                   positions, config=config, options=options, out_index=jnp.zeros((1, 1), jnp.int32))
    h2 = jax.lax.dynamic_slice_in_dim(jnp.concatenate([h_last, hidden], axis=1), last, 2, axis=1)
    return row_cache, logits[:, 0], h2, hidden[:, -1:]


_place_jit = jax.jit(_place, donate_argnums=(0,))


@dataclasses.dataclass
class _Filling:
    """A prompt longer than the engine's prefill chunk, being prefilled a chunk per loop turn into ``row`` (its
    own one-row cache) while its slot stays out of the decode; ``ends``: the hidden state at the last position
    of each chunk filled so far (``[1,1,D]`` each; speculation's MTP rows start from the last)."""

    request: Request
    slot: int
    row: dict
    tokens: np.ndarray  # [1, chunks * chunk], right-padded
    ends: list = dataclasses.field(default_factory=list)


class Engine:
    """Continuous batching over ``slots`` cache rows of ``max_len`` positions (module docstring). ``submit``
    queues a ``Request`` (up to ``max_queue`` waiting, else ``QueueFull``); ``start`` / ``stop`` run the loop in
    a thread. ``eos``: the token ids that end a sequence; ``tokenizer`` decodes the text (stop strings need it).
    ``prefill_chunk`` (a power of two): longer prompts are prefilled that many tokens per loop turn, between
    decode steps. ``prefix_cache``: the filled rows of that many recent long prompts are kept (one pool row of
    memory each), and a prompt that starts with whole chunks of one (a shared system prompt) fills only the
    rest."""

    def __init__(self, config: ModelConfig, params, *, tokenizer=None, eos: Sequence[int] = (), slots: int = 8,
                 max_len: Optional[int] = None, max_queue: int = 64, options: Optional[ModelOptions] = None,
                 cache_dtype: Optional[str] = None, min_bucket: int = 16, window_min: Optional[int] = 128,
                 steps_per_call: int = 4, prefill_chunk: int = 512, prefix_cache: int = 4,
                 speculative: bool = False, mesh=None, page: Optional[int] = PAGE):
        if config.is_v4:
            raise ValueError("the serving engine does not run DeepSeek-V4 yet (its compressed caches have no "
                             "slot pool here)")
        if page is not None and page < 0:
            raise ValueError(f"page = {page}: expected a positive number of cache slots (or None / 0: a window)")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots = {slots}, max_queue = {max_queue}: expected >= 1 and >= 0")
        if prefill_chunk < min_bucket or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk = {prefill_chunk}: expected a power of two >= min_bucket ({min_bucket})")
        if speculative and config.num_nextn_predict_layers < 1:
            raise ValueError(f"speculative decoding needs an MTP module; this {config.model_type} config has none "
                             "(num_nextn_predict_layers = 0, or the checkpoint carried no MTP weights)")
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.params = params if mesh is None else place_params(config, params, mesh)
        self.options = default_options() if options is None else options
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        self.slots, self.max_queue, self.min_bucket = slots, max_queue, min_bucket
        # the smallest attention window (None: every step reads the whole padded row)
        self.window_min = window_min or self.max_len
        # ragged decode: each row reads the pages of `page` slots its own length fills (None, on a mesh, or for
        # V3.2: the window past the longest running sequence)
        self.page = page if page and mesh is None and pages_supported(config) else None
        # decode steps per host round trip while no request waits for a slot (1 when one does, so that it is
        # admitted at the next step)
        self.steps_per_call = max(1, steps_per_call)
        # prompts longer than this are prefilled this many tokens per loop turn, between decode steps
        self.prefill_chunk = prefill_chunk
        # the rows of the last `prefix_cache` long prompts, kept so that a prompt that starts with whole chunks
        # of one of them (a shared system prompt) fills from there: {chunk-aligned prefix: row}, newest last
        self.prefix_cache = max(0, prefix_cache)
        self._prefixes: collections.OrderedDict[tuple, tuple[dict, jax.Array]] = collections.OrderedDict()
        # draft a token per step with the MTP module and verify it in the same step (1 or 2 tokens a step)
        self.speculative = speculative
        self.eos = frozenset(int(e) for e in eos)
        self.cache_dtype = cache_dtype or self.options.dtype
        self.cache = self._new_cache(slots, self.max_len)
        self.running: list[Optional[Request]] = [None] * slots
        self.filling: Optional[_Filling] = None
        self.waiting: collections.deque[Request] = collections.deque()
        self._tok = np.zeros(slots, np.int32)
        self._pos = np.zeros(slots, np.int32)
        # speculation's state per slot: the token before `_tok`, the hidden states at the last two positions
        self._t_prev = np.zeros(slots, np.int32)
        self._h2 = jnp.zeros((slots, 2, config.hidden_size), self.options.compute_dtype) if speculative else None
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.stats = {"steps": 0, "admitted": 0, "prefill_chunks": 0, "prefix_hits": 0, "prefix_chunks_reused": 0,
                      "finished": 0, "cancelled": 0, "errors": 0, "generated_tokens": 0, "drafted": 0,
                      "accepted": 0, "paged_calls": 0}

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
            if len(self._free_slots()) <= len(self.waiting) and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.slots} requests running and {len(self.waiting)} waiting (the limit)")
            request.seq = _Sequence(self.tokenizer, request.stop)
            self.waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, *requests: Request) -> None:
        """Stop ``requests`` (a client gone): they leave their slots (or the queue) before the next step; those
        already finished are left as they are."""
        with self._lock:
            for request in requests:
                if request.seq is None or request.seq.finished is None:
                    request.cancelled = True
            self._lock.notify()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.running)

    def _free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.running)
                if r is None and (self.filling is None or self.filling.slot != i)]

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
                while not self._stopping and not self.waiting and not self.active and self.filling is None:
                    self._lock.wait()
                if self._stopping:
                    break
            self.run_once()
        with self._lock:
            for req in [*self.waiting, *(r for r in self.running if r is not None),
                        *([self.filling.request] if self.filling else [])]:
                self._finish(req, "cancelled")
            self.waiting.clear()
            self.filling = None

    def run_once(self) -> None:
        """One turn of the loop (``start`` runs them in a thread; a test may call it by hand): admit waiting
        requests into free slots (a short prompt is prefilled whole; a long one starts filling, one at a time),
        prefill one chunk of the long prompt being filled, then decode the running requests."""
        with self._lock:
            self._drop_cancelled()
            admit = []
            for slot in self._free_slots():
                if not self.waiting:
                    break
                req = self.waiting[0]
                if len(req.prompt) > self.prefill_chunk:
                    if self.filling is not None:
                        break  # one long prompt at a time; the queue keeps its order
                    self.filling = self._start_filling(req, slot)
                else:
                    self.running[slot] = req
                    admit.append(req)
                self.waiting.popleft()
                req.slot = slot
        try:
            with mesh_context(self.mesh):  # (a no-op on one device)
                for req in admit:
                    self._prefill(req)
                if self.filling is not None:
                    self._fill_chunk()
                if self.active:
                    self.step()
        except Exception as e:  # noqa: BLE001 -- the requests fail, the engine serves on
            self._fail(e)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for slot, req in enumerate(self.running):
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        if self.filling is not None and self.filling.request.cancelled:
            self._finish(self.filling.request, "cancelled")

    def _fail(self, error: Exception) -> None:
        """A prefill or step failed: every running request ends with finish reason "error" (``Request.error`` says
        why) and the cache pool, which the failed call may have consumed (it is donated), is made again; the
        waiting requests go on."""
        with self._lock:
            for req in [r for r in self.running if r is not None] + ([self.filling.request] if self.filling else []):
                req.error = f"{type(error).__name__}: {error}"
                self._finish(req, "error")
            self.cache = self._new_cache(self.slots, self.max_len)

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot is not None and self.running[req.slot] is req:
            self.running[req.slot] = None
        if self.filling is not None and self.filling.request is req:
            self.filling = None
        self.stats["cancelled" if reason == "cancelled" else "errors" if reason == "error" else "finished"] += 1
        _notify(req, "", None, None, reason)

    def _prefill(self, req: Request) -> None:
        """A prompt of up to ``prefill_chunk`` tokens, right-padded to its bucket, prefilled whole into its slot."""
        n = len(req.prompt)
        t = min(bucket_length(n, self.min_bucket), self.max_len)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = req.prompt
        row = self._new_cache(1, self.max_len)
        self.cache, tok, logp, h2 = _admit(
            self.cache, row, self.params, jnp.asarray(tokens), jnp.asarray([n], jnp.int32),
            jnp.asarray(req.slot, jnp.int32), *self._sampling(req), config=self.config, options=self.options,
            mtp=self.speculative)
        self._started(req, tok, logp, h2)

    def _new_cache(self, rows: int, length: int) -> kv_cache.Cache:
        """An empty cache of ``rows`` x ``length`` (the MTP's too when speculating), on the mesh: the rows over
        its batch axes where they divide (a one-row cache is replicated)."""
        cache = kv_cache.init_cache(self.config, rows, length, self.cache_dtype, mtp=self.speculative)
        return cache if self.mesh is None else jax.device_put(cache, kv_cache.cache_shardings(cache, self.mesh))

    def _sampling(self, req: Request) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.asarray([req.temperature], jnp.float32), jnp.asarray([req.top_p], jnp.float32),
                jnp.asarray([req.seed], jnp.uint32))

    def _started(self, req: Request, tok, logp, h2) -> None:
        """``req``'s prompt is in its slot: it decodes from the next step on, from its first token (``h2``: the
        hidden states at the prompt's last two positions, which speculation drafts from)."""
        with self._lock:
            self.running[req.slot] = req
        self.stats["admitted"] += 1
        self._tok[req.slot], self._pos[req.slot] = int(tok), len(req.prompt)
        if self.speculative:
            self._t_prev[req.slot] = req.prompt[-1]
            self._h2 = self._h2.at[req.slot].set(h2[0].astype(self._h2.dtype))
        self._emit(req, int(tok), float(logp))

    def _start_filling(self, req: Request, slot: int) -> _Filling:
        c, n = self.prefill_chunk, len(req.prompt)
        tokens = np.zeros((1, -(-n // c) * c), np.int32)
        tokens[0, :n] = req.prompt
        for k in range((n - 1) // c, 0, -1):  # the longest cached prefix of whole chunks (one token left to run)
            kept = self._prefixes.get(tuple(req.prompt[:k * c]))
            if kept is not None:
                self.stats["prefix_hits"] += 1
                self.stats["prefix_chunks_reused"] += k
                row, ends = kept
                # a copy: the fill donates its row (the entries past k chunks are overwritten or never read)
                return _Filling(req, slot, jax.tree.map(jnp.copy, row), tokens,
                                ends=[ends[:, i:i + 1] for i in range(k)])
        # one row as long as the whole chunks of the longest prompt a slot takes, so that it compiles once
        row_len = -(-self.max_len // c) * c
        return _Filling(req, slot, self._new_cache(1, row_len), tokens)

    def _keep_prefixes(self, prompt: Sequence[int], row: dict, ends: list) -> None:
        """Remember ``row`` (and ``ends``, each chunk's last hidden state: speculation's MTP rows start from it)
        under each whole-chunk prefix of ``prompt``, dropping the oldest rows past ``prefix_cache``."""
        if not self.prefix_cache:
            return
        c = self.prefill_chunk
        kept = (row, jnp.concatenate(ends, axis=1))
        for k in range(1, len(prompt) // c + 1):
            key = tuple(prompt[:k * c])
            self._prefixes.pop(key, None)
            self._prefixes[key] = kept
        while len({id(r) for r in self._prefixes.values()}) > self.prefix_cache:
            oldest = next(iter(self._prefixes.values()))
            for key in [key for key, r in self._prefixes.items() if r is oldest]:
                del self._prefixes[key]

    def _fill_chunk(self) -> None:
        """The next chunk of the prompt being filled (attending over a power-of-two window past it); after its
        last chunk the row goes into the request's slot and the request decodes from the next step."""
        f, c = self.filling, self.prefill_chunk
        n = len(f.request.prompt)
        start = len(f.ends) * c
        end = start + c
        h_last = f.ends[-1] if f.ends else jnp.zeros((1, 1, self.config.hidden_size), self.options.compute_dtype)
        row_len = jax.tree.leaves(f.row["main"])[0].shape[kv_cache.SLOT_AXIS]
        window = decode_window(end, row_len, self.window_min)
        f.row, logits, h2, h_end = _fill(
            f.row, self.params, jnp.asarray(f.tokens[:, start:end]), jnp.asarray(start, jnp.int32),
            jnp.asarray(min(n - 1 - start, c - 1), jnp.int32), h_last, config=self.config, options=self.options,
            window=window, mtp=self.speculative)
        f.ends.append(h_end)
        self.stats["prefill_chunks"] += 1
        if end < n:
            return
        self.cache, tok, logp = _place_jit(self.cache, f.row, jnp.asarray(f.slot, jnp.int32), logits,
                                           *self._sampling(f.request))
        self._keep_prefixes(f.request.prompt, f.row, f.ends)
        with self._lock:
            self.filling = None
            self._started(f.request, tok, logp, h2)

    def step(self) -> None:
        """Decode steps over every slot (``steps_per_call`` in one call while no request waits and some running
        request wants that many more tokens, else one); each running request gets its next tokens."""
        running = list(self.running)
        live = [r for r in running if r is not None]
        k = self.steps_per_call
        if k > 1 and (self.waiting or self.filling or max(r.max_tokens - len(r.seq.tokens) for r in live) < k):
            k = 1
        temperature = np.array([r.temperature if r else 0.0 for r in running], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in running], np.float32)
        seeds = np.array([r.seed if r else 0 for r in running], np.uint32)
        counts = np.array([len(r.seq.tokens) if r else 0 for r in running], np.int32)
        # free slots decode from position 0 (their rows are dropped): they read nothing
        pos = np.where([r is not None for r in running], self._pos, 0).astype(np.int32)
        if self.speculative:
            return self._step_speculative(running, k, temperature, top_p, seeds, counts, pos)
        self.cache, nxt, logp = _decode(self.params, self.cache, jnp.asarray(self._tok), jnp.asarray(pos),
                                        jnp.asarray(temperature), jnp.asarray(top_p), jnp.asarray(seeds),
                                        jnp.asarray(counts), config=self.config, options=self.options,
                                        **self._reads(pos, k), k=k)
        nxt, logp = np.asarray(nxt), np.asarray(logp)
        self.stats["steps"] += k
        for j in range(k):  # a request that finishes at token j drops the rest of its row's tokens
            for slot, req in enumerate(running):
                if req is None or self.running[slot] is not req:
                    continue
                self._tok[slot], self._pos[slot] = nxt[j, slot], self._pos[slot] + 1
                self._emit(req, int(nxt[j, slot]), float(logp[j, slot]))

    def _reads(self, pos: np.ndarray, ahead: int) -> dict:
        """What the decode call's attention reads when the rows at ``pos`` gain up to ``ahead`` positions: each
        row its own pages, or a window past the longest row (``steps.decode_reads``)."""
        reads = decode_reads(pos, ahead, self.max_len, self.page, self.window_min)
        self.stats["paged_calls"] += reads["paged"] is not None
        return reads

    def _step_speculative(self, running, k, temperature, top_p, seeds, counts, pos) -> None:
        """``k`` draft-verify steps (``_decode_speculative``): each running request gets 1 or 2 tokens a step."""
        self.cache, (x, n, t_prev, self._h2), toks, logps, accepted = _decode_speculative(
            self.params, self.cache, jnp.asarray(self._tok), jnp.asarray(pos), jnp.asarray(self._t_prev),
            self._h2, jnp.asarray(temperature), jnp.asarray(top_p), jnp.asarray(seeds), jnp.asarray(counts),
            config=self.config, options=self.options, **self._reads(pos, 2 * k), k=k)
        x, n, t_prev, toks, logps, accepted = (np.asarray(a) for a in (x, n, t_prev, toks, logps, accepted))
        self.stats["steps"] += k
        for slot, req in enumerate(running):
            if req is not None:  # the state of free slots stays (their outputs are dropped)
                self._tok[slot], self._pos[slot], self._t_prev[slot] = x[slot], n[slot], t_prev[slot]
        for j in range(k):
            for slot, req in enumerate(running):
                if req is None or self.running[slot] is not req:
                    continue
                self.stats["drafted"] += 1
                self.stats["accepted"] += int(accepted[j, slot])
                for i in range(1 + int(accepted[j, slot])):
                    if self.running[slot] is req:
                        self._emit(req, int(toks[j, slot, i]), float(logps[j, slot, i]))

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
