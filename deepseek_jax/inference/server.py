"""``deepseek-jax serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn, the ``serve`` extra) over the
continuous-batching ``Engine`` (``inference/engine.py``).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, with ``stream: true``
(server-sent events, ``data: [DONE]`` last), ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``,
``logprobs`` (the chosen tokens' log-probabilities: the engine computes them anyway; no top alternatives) and a
``usage`` block. R1-style models (chat style "r1") return their ``<think>`` part as ``reasoning_content``, as
DeepSeek's API does.

Bad requests get a 4xx with an OpenAI-style body, ``{"error": {"message", "type", "param", "code"}}``, and the
server keeps serving: invalid JSON, unknown or out-of-range fields (400), an unknown model (404), a prompt longer
than the context (400), too many requests (429, past ``max_queue`` waiting). A client that disconnects mid-stream
(or while waiting for a whole answer) frees its slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from deepseek_jax.data.chat_template import ReasoningSplit, render
from deepseek_jax.inference.engine import Engine, QueueFull, Request, Stopped

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}


class _Sampling(BaseModel):
    """The fields both endpoints take; anything else is refused (400), as is a value out of range."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**32)
    user: Optional[str] = None
    # accepted at their neutral values only: the engine has no such penalties
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionBody(_Sampling):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=0)  # 0: the chosen tokens' log-probabilities only
    echo: bool = Field(False, le=False)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=0)


def _error(status: int, message: str, kind: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def make_app(engine: Engine, model_name: str, tokenizer, *, chat_style: str = "v3") -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name`` (``tokenizer``: ``data/tokenizer.py``'s)."""
    app = FastAPI(title="deepseek-jax", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        what = "invalid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid request")
        return _error(400, f"{'.'.join(loc) + ': ' if loc else ''}{what}", "invalid_request_error",
                      ".".join(loc) or None)

    @app.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "deepseek-jax"}]}

    @app.get("/health")
    async def health():
        return {"running": engine.active, "waiting": len(engine.waiting), **engine.stats}

    async def generate(http: HttpRequest, body: _Sampling, prompt: list[int], max_tokens: Optional[int], chat: bool):
        if body.model != model_name:
            return _error(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                          "invalid_request_error", "model")
        max_tokens = max_tokens or (engine.max_len - len(prompt) if chat else 16)
        if any(not s for s in body.stops()):
            return _error(400, "stop: an empty stop string would end every completion at once",
                          "invalid_request_error", "stop")
        if body.stream and (body.logprobs if chat else body.logprobs is not None):
            return _error(400, "logprobs: not available with stream: true here (ask without streaming)",
                          "invalid_request_error", "logprobs")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = []
        stops = body.stops() + (("User:",) if chat and chat_style == "v2" else ())
        try:
            for i in range(body.n):
                seed = (body.seed + i) % 2**32 if body.seed is not None else \
                    int.from_bytes(uuid.uuid4().bytes[:4], "little")
                req = Request(prompt, max_tokens, lambda *e, i=i: loop.call_soon_threadsafe(events.put_nowait,
                                                                                            (i, *e)),
                              temperature=body.temperature, top_p=body.top_p, seed=seed, stop=stops)
                requests.append(engine.submit(req))
        except QueueFull as e:
            engine.cancel(*requests)
            return _error(429, f"the server is busy: {e}; retry later", "rate_limit_error")
        except Stopped as e:
            return _error(503, f"{e}", "server_error")
        except ValueError as e:
            engine.cancel(*requests)
            return _error(400, str(e), "invalid_request_error", "messages" if chat else "prompt")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        if body.stream:
            return StreamingResponse(_stream(http, body, events, requests, meta, chat, len(prompt)),
                                     media_type="text/event-stream")
        return await _whole(http, body, events, requests, meta, chat, len(prompt))

    async def _events(http, events, requests):
        """The engine's events until every request has finished; a client gone cancels them all."""
        left, loop = len(requests), asyncio.get_running_loop()
        checked = loop.time()
        try:
            while left:
                try:
                    item = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    item = None
                if loop.time() - checked > 0.5:  # a client gone (also while tokens keep coming)
                    checked = loop.time()
                    if await http.is_disconnected():
                        return
                if item is None:
                    continue
                if item[4] is not None:
                    left -= 1
                yield item
        finally:
            engine.cancel(*requests)

    def _usage(prompt_len, requests):
        done = sum(len(r.seq.tokens) for r in requests)
        return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}

    async def _whole(http, body, events, requests, meta, chat, prompt_len):
        finish = [None] * len(requests)
        async for i, _, _, _, fin in _events(http, events, requests):
            if fin is not None:
                finish[i] = FINISH[fin]
        failed = [r.error for r in requests if r.error]
        if failed:
            return _error(500, f"generation failed: {failed[0]}", "server_error")
        choices = []
        for i, r in enumerate(requests):
            text = r.seq.text
            logprobs = [float(x) for x in r.seq.logprobs]
            tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in r.seq.tokens]
            if chat:
                message = {"role": "assistant", "content": text}
                if chat_style == "r1":  # the stream's rule: reasoning until the first </think> (all, if none)
                    reasoning, answer = ReasoningSplit().feed(text, final=True)
                    message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
                choice = {"index": i, "message": message, "finish_reason": finish[i]}
                if body.logprobs:
                    choice["logprobs"] = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                                       "top_logprobs": []} for t, lp in zip(tokens, logprobs)]}
                else:
                    choice["logprobs"] = None
            else:
                choice = {"index": i, "text": text, "finish_reason": finish[i], "logprobs": None}
                if body.logprobs is not None:
                    choice["logprobs"] = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None,
                                          "text_offset": None}
            choices.append(choice)
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(prompt_len, requests)}

    async def _stream(http, body, events, requests, meta, chat, prompt_len):
        kind = "chat.completion.chunk" if chat else "text_completion"
        split = [ReasoningSplit() for _ in requests] if chat and chat_style == "r1" else None

        def chunk(i, piece, fin, reasoning=""):
            if chat:
                delta = {"content": piece} if piece or not reasoning else {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                choice = {"index": i, "delta": delta, "finish_reason": fin, "logprobs": None}
            else:
                choice = {"index": i, "text": piece, "finish_reason": fin, "logprobs": None}
            return "data: " + _json({**meta, "object": kind, "choices": [choice]}) + "\n\n"

        try:
            async for line in _stream_lines(http, body, events, requests, meta, chat, prompt_len, kind, split,
                                            chunk):
                yield line
        finally:  # the client gone at any point (the role chunks included): its requests end
            engine.cancel(*requests)

    async def _stream_lines(http, body, events, requests, meta, chat, prompt_len, kind, split, chunk):
        if chat:
            for i in range(len(requests)):
                yield "data: " + _json({**meta, "object": kind, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}) + "\n\n"
        async for i, piece, _, _, fin in _events(http, events, requests):
            reasoning = ""
            if fin == "error":
                yield "data: " + _json({"error": {"message": f"generation failed: {requests[i].error}",
                                                  "type": "server_error", "param": None, "code": None}}) + "\n\n"
                break
            if split is not None:
                reasoning, piece = split[i].feed(piece, final=fin is not None)
            if piece or reasoning or fin is not None:
                yield chunk(i, piece, FINISH[fin] if fin else None, reasoning)
        if (body.stream_options or {}).get("include_usage"):
            yield "data: " + _json({**meta, "object": kind, "choices": [],
                                    "usage": _usage(prompt_len, requests)}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(http: HttpRequest, body: CompletionBody):
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return await generate(http, body, prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest, body: ChatBody):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            prompt = tokenizer.encode(render(messages, chat_style), add_bos=False)
        except ValueError as e:
            return _error(400, str(e), "invalid_request_error", "messages")
        return await generate(http, body, prompt, body.max_completion_tokens or body.max_tokens, chat=True)

    return app


def _json(obj) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
