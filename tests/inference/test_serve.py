"""``deepseek-jax serve`` (inference/engine.py, inference/server.py): the official ``openai`` client against a server
on 127.0.0.1 over a tiny checkpoint gets ``generate``'s greedy completions, streamed and not, for 8 concurrent
requests too; bad requests get an OpenAI-style 4xx and the server keeps serving; a client that leaves mid-stream
frees its slot. Each test module starts and stops its own server; every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time

import numpy as np
import pytest
from tiny_inference import engine_tokens, tiny_checkpoint, word_tokenizer

import deepseek_jax as dsj
from deepseek_jax.data.chat_template import render
from deepseek_jax.data.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
try:  # the openai client's own HTTP stack (httpx2 from openai 3 on)
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = ["w5 w17 w300 w2 w9", "w3", "w250 w11 w60 w2 w7 w7 w100 w8 w9 w10 w11 w12", "w40 w41",
           "w7 w8 w9", "w100", "w200 w201 w202", "w13 w14 w15 w16 w17"]
MAX_TOKENS = 10


class _Server:
    """A uvicorn server in a thread, on a free port; ``close`` stops it and the engine."""

    def __init__(self, config, params, tokenizer, eos=None, **engine_kwargs):
        from deepseek_jax.inference.engine import Engine
        from deepseek_jax.inference.server import make_app

        eos = (tokenizer.eos_id,) if eos is None else eos
        self.engine = Engine(config, params, tokenizer=tokenizer, eos=eos, **engine_kwargs).start()
        app = make_app(self.engine, "tiny", tokenizer)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config, params, _, path = tiny_checkpoint("tiny-v3")
    root = tmp_path_factory.mktemp("serve")
    word_tokenizer(root)
    tokenizer = Tokenizer(str(root / "tokenizer.json"))
    server = _Server(config, params, tokenizer, slots=4, max_len=64, max_queue=16)
    # generate's greedy completions of the same prompts, the reference
    ids = [tokenizer.encode(p) for p in PROMPTS]
    ref = dsj.generate(config, params, ids, max_new_tokens=MAX_TOKENS, tokenizer=tokenizer,
                       eos_token_id=tokenizer.eos_id)
    yield {"server": server, "config": config, "params": params, "tokenizer": tokenizer, "ref": ref}
    server.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # compiles the engine's prefill and decode steps and starts a server
def test_greedy_completions_equal_generate_streamed_and_not(served):
    client, ref = served["server"].client, served["ref"]
    for i, prompt in enumerate(PROMPTS[:3]):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == ref.texts[i]
        assert out.choices[0].finish_reason == ("length" if ref.finish_reasons[i] == "length" else "stop")
        assert out.usage.prompt_tokens == len(served["tokenizer"].encode(prompt))
        assert out.usage.completion_tokens == len(ref.tokens[i])
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)]
        assert "".join(pieces) == ref.texts[i]
    # a stop string cuts the text before it; include_usage adds a usage chunk to the stream
    words = ref.texts[0].split()
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    stop=[words[2]])
    assert out.choices[0].text == ref.texts[0][:ref.texts[0].index(words[2])] and \
        out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == len(ref.tokens[0]) and not chunks[-1].choices
        # logprobs: the chosen tokens' log-probabilities, generate's
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=0)
    np.testing.assert_allclose(out.choices[0].logprobs.token_logprobs, ref.logprobs[0], atol=1e-4)
    # chat: the rendered conversation's greedy completion
    tok = served["tokenizer"]
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w30 w31 w32"}]
    ids = tok.encode(render(messages, "v3"), add_bos=False)
    want = dsj.generate(served["config"], served["params"], [ids], max_new_tokens=MAX_TOKENS, tokenizer=tok,
                        eos_token_id=tok.eos_id).texts[0]
    out = served["server"].client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS,
                                                          temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in served["server"].client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert "".join(pieces) == want


@pytest.mark.slow
def test_eight_concurrent_requests_all_return_their_text(served):
    client, ref = served["server"].client, served["ref"]
    # 4 slots: the 8 requests join and leave the running batch
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=MAX_TOKENS,
                               temperature=0) for p in PROMPTS]
        texts = [f.result(timeout=300).choices[0].text for f in futures]
    assert texts == ref.texts
    # seeded sampling: the same seed gives the same tokens whatever runs beside it; n > 1 gives n choices
    sampled = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.0,
                                        top_p=0.9, seed=7, n=2)
    again = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.0,
                                      top_p=0.9, seed=7, n=2)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices] and len(sampled.choices) == 2
    assert sampled.choices[0].text != sampled.choices[1].text  # seeds 7 and 8


def _post(url, path, payload, raw=None):
    with httpx.Client(timeout=60) as c:
        if raw is not None:
            return c.post(url + path, content=raw, headers={"content-type": "application/json"})
        return c.post(url + path, json=payload)


@pytest.mark.slow
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(served):
    url, ref = served["server"].url, served["ref"]
    good = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}
    cases = [
        (None, b"{not json", 400, "invalid JSON"),
        ("/completions", {**good, "bogus": 1}, 400, "bogus"),
        ("/completions", {**good, "temperature": -1}, 400, "temperature"),
        ("/completions", {**good, "max_tokens": 0}, 400, "max_tokens"),
        ("/completions", {**good, "prompt": " ".join(["w5"] * 70)}, 400, "exceeds the context of 64 tokens"),
        ("/completions", {**good, "model": "gpt-4"}, 404, "does not exist"),
        ("/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "w1"}]}, 400, "role"),
        ("/completions", {**good, "stop": [""]}, 400, "empty stop string"),
        ("/completions", {**good, "stream": True, "logprobs": 0}, 400, "not available with stream"),
    ]
    for path, payload, status, words in cases:
        r = _post(url, path or "/completions", payload, raw=payload if path is None else None)
        assert r.status_code == status, (payload, r.text)
        error = r.json()["error"]
        assert words in error["message"] and error["type"], (payload, error)
        ok = _post(url, "/completions", good)  # and the next request succeeds
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == ref.texts[1]


@pytest.mark.slow
def test_queue_limit_gives_429_and_a_client_gone_frees_its_slot(tmp_path):
    config, params, _, _ = tiny_checkpoint("tiny-v3")
    word_tokenizer(tmp_path)
    tokenizer = Tokenizer(str(tmp_path / "tokenizer.json"))
    # One slot, no queue; the long request cannot end early (no EOS) nor within the waits below (4,000 tokens:
    # seconds even for the tiny model), whatever the machine's speed. The whole-row decode: one compiled step.
    server = _Server(config, params, tokenizer, eos=(), slots=1, max_len=4096, max_queue=0, window_min=None)
    try:
        long = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 4000, "temperature": 1.0, "seed": 1,
                "stream": True}
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server.url + "/completions", json=long) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"][0]["index"] == 0
                busy = _post(server.url, "/completions", {"model": "tiny", "prompt": "w5", "max_tokens": 2})
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            # the stream is closed: its request is cancelled and its slot freed
        deadline = time.time() + 60
        while server.engine.active:
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.05)
        assert server.engine.stats["cancelled"] >= 1
        # a client that gives up waiting for a whole (non-streamed) answer frees its slot too
        with pytest.raises(httpx.TimeoutException):
            with httpx.Client(timeout=0.5) as c:
                c.post(server.url + "/completions", json={**long, "stream": False})
        deadline = time.time() + 60
        while server.engine.active or server.engine.stats["cancelled"] < 2:
            assert time.time() < deadline, "the slot of the request whose client left was not freed"
            time.sleep(0.05)
        ok = _post(server.url, "/completions", {"model": "tiny", "prompt": "w5", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.close()


@pytest.mark.slow  # the engine compiles a decode step per window
def test_windowed_decode_equals_the_padded_decode():
    """A decode step that reads only the cache's first ``window`` slots (``decode_core(..., window=W)``, what the
    engine runs) gives the logits of the step over the whole padded cache (fp32, 1e-5) and writes the same
    entries; the engine, whose windows grow as its sequences do (16, 32, 64 here), gives ``generate``'s tokens."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from deepseek_jax.inference.engine import Engine
    from deepseek_jax.inference.steps import decode_core, prefill_core
    from deepseek_jax.layers import kv_cache

    config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)
    params = nn.meta.unbox(dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
                           ["params"])
    options = dsj.ModelOptions()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (2, 32)).astype(np.int32)
    lengths = jnp.asarray([5, 27], jnp.int32)
    cache = kv_cache.init_cache(config, 2, 256, "float32")
    cache, logits, _ = prefill_core(params, cache, jnp.asarray(tokens), lengths, config=config, options=options)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    padded = decode_core(params, cache, nxt, lengths[:, None], config=config, options=options)
    windowed = decode_core(params, cache, nxt, lengths[:, None], config=config, options=options, window=32)
    np.testing.assert_allclose(np.asarray(windowed[1]), np.asarray(padded[1]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(windowed[0]), jax.tree.leaves(padded[0])):  # (a later layer's new entries
        assert a.shape == b.shape  # follow its input, whose attention summed over fewer masked slots: rounding)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    prompts = [list(rng.integers(1, config.vocab_size, n)) for n in (3, 12, 30, 7)]
    ref = dsj.generate(config, params, prompts, max_new_tokens=24, eos_token_id=None, options=options)
    engine = Engine(config, params, slots=2, max_len=256, window_min=16, options=options, steps_per_call=3).start()
    assert engine_tokens(engine, prompts, 24) == ref.tokens


@pytest.mark.slow  # a subprocess loads the checkpoint and compiles
def test_serve_command_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    """``deepseek-jax serve --checkpoint DIR``: the model id is the directory's name, a completion comes back, and
    SIGINT (Ctrl-C) ends the process with exit code 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    _, _, _, path = tiny_checkpoint("tiny-v3")
    word_tokenizer(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_jax.cli", "serve", "--checkpoint", path, "--tokenizer",
                             str(tmp_path / "tokenizer.json"), "--port", str(port), "--slots", "2", "--max-len", "64"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the server did not come up"
            try:
                models = httpx.get(url + "/models", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        name = os.path.basename(os.path.normpath(path))
        assert [m["id"] for m in models["data"]] == [name]
        out = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300).completions.create(
            model=name, prompt="w5 w6", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_r1_reasoning_split_is_the_same_streamed_and_whole():
    """R1-style chat: what comes before the first ``</think>`` is ``reasoning_content`` (all of it when there is no
    ``</think>``, as DeepSeek's API), the rest ``content``; a stream split at any point gives the same parts."""
    from deepseek_jax.data.chat_template import ReasoningSplit, split_reasoning

    for text, want in (("let me think\n</think>\n\nthe answer", ("let me think\n", "the answer")),
                       ("no end of thought", ("no end of thought", "")),
                       ("a</think>b</think>c", ("a", "b</think>c"))):
        assert ReasoningSplit().feed(text, final=True) == want == split_reasoning(text)
        assert split_reasoning("<think>\n" + text) == want
        for cut in range(len(text) + 1):
            split = ReasoningSplit()
            parts = [split.feed(text[:cut]), split.feed(text[cut:], final=True)]
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == want, (text, cut)


@pytest.mark.slow  # compiles the engine's steps
def test_a_long_prompt_is_prefilled_between_decode_steps():
    """A prompt past the engine's ``prefill_chunk`` fills its slot a chunk per loop turn while the running request
    decodes a token per turn (its slot stays out of the decode until its last chunk), in slots of 100 tokens (not a
    multiple of the chunk); both requests' greedy tokens equal ``generate``'s with the same chunk. A later prompt
    that begins with whole chunks of the long one fills only the rest, with ``generate``'s tokens. A request
    cancelled while it fills frees its slot."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from deepseek_jax.inference.engine import Engine, Request

    config = dsj.presets["tiny-v3"].replace(num_nextn_predict_layers=0)
    params = nn.meta.unbox(dsj.Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
                           ["params"])
    rng = np.random.default_rng(2)
    short, long = (list(rng.integers(1, config.vocab_size, n)) for n in (5, 50))
    ref = dsj.generate(config, params, [short, long], max_new_tokens=12, eos_token_id=None, prefill_chunk=16)
    engine = Engine(config, params, slots=2, max_len=100, window_min=16, prefill_chunk=16, steps_per_call=4)
    out, fin = {}, {}

    def request(name, prompt):
        out[name] = []
        return engine.submit(Request(prompt, 12, lambda text, tok, lp, f: (
            out[name].append(tok) if tok is not None else None, f and fin.setdefault(name, f))))

    request("a", short)
    engine.run_once()  # the loop is turned by hand: a is prefilled whole and decodes 4 steps in one call
    assert len(out["a"]) == 5 and engine.stats["prefill_chunks"] == 0
    request("b", long)
    for turn in range(1, 4):  # 50 tokens in chunks of 16: 4 chunks; each of the first 3 turns a decodes 1 token
        engine.run_once()
        assert (len(out["a"]), out["b"], engine.stats["prefill_chunks"]) == (5 + turn, [], turn)
        assert engine.filling is not None and engine.filling.slot == 1 and engine.running[1] is None
    engine.run_once()  # the last chunk: b takes its slot and samples its first token; nothing waits or fills
    assert engine.filling is None and len(out["b"]) == 1 + 4 and len(out["a"]) == 8 + 4  # so: 4 steps a call
    for _ in range(20):
        if len(fin) == 2:
            break
        engine.run_once()
    assert fin == {"a": "length", "b": "length"}
    assert [out["a"], out["b"]] == ref.tokens

    # a prompt that shares b's first 40 tokens fills from b's kept row after their 2 whole chunks (32 tokens)
    shared = long[:40] + list(rng.integers(1, config.vocab_size, 20))
    chunks = engine.stats["prefill_chunks"]
    request("d", shared)
    for _ in range(20):
        if "d" in fin:
            break
        engine.run_once()
    assert (engine.stats["prefix_hits"], engine.stats["prefix_chunks_reused"]) == (1, 2)
    assert engine.stats["prefill_chunks"] - chunks == 4 - 2
    assert out["d"] == dsj.generate(config, params, [shared], max_new_tokens=12, eos_token_id=None,
                                    prefill_chunk=16).tokens[0]

    c = request("c", list(rng.integers(1, config.vocab_size, 50)))  # (not b's prompt: it would fill from b's row)
    engine.run_once()
    assert engine.filling is not None and engine.filling.request is c
    engine.cancel(c)
    engine.run_once()
    assert fin["c"] == "cancelled" and engine.filling is None and engine._free_slots() == [0, 1]
