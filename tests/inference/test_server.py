"""The OpenAI-compatible server: the official `openai` client, streaming, errors, queue bound, disconnects,
64 concurrent clients, metrics."""
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from megatron_r1.inference import Engine, SamplingParams
from megatron_r1.inference.server import create_app

from .conftest import make_model

MODEL = "tiny-test"
CONTEXT = 128


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(parallel_tp1):
    import uvicorn

    from megatron_r1.data.tokenizer import load_tokenizer

    engine = Engine(make_model("llama_tiny", seed=31), tokenizer=load_tokenizer("builtin:demo"), max_batch_size=16,
                    max_seq_len=CONTEXT, max_queue=256)
    app = create_app(engine, MODEL, max_n=4)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        timeout_graceful_shutdown=5))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def test_openai_client_completions_and_chat(server):
    openai = pytest.importorskip("openai")
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = client.completions.create(model=MODEL, prompt="What is 2 plus 3?", max_tokens=6, temperature=0,
                                  logprobs=1)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].text, str)
    assert len(r.choices[0].logprobs.token_logprobs) == r.usage.completion_tokens
    assert all(lp <= 0 for lp in r.choices[0].logprobs.token_logprobs)

    # streaming yields the same text as the non-streamed greedy answer
    chunks = list(client.completions.create(model=MODEL, prompt="What is 2 plus 3?", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text

    # same seed -> same text; n choices
    a = client.completions.create(model=MODEL, prompt="Calculate", max_tokens=8, seed=7, n=2)
    b = client.completions.create(model=MODEL, prompt="Calculate", max_tokens=8, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2

    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                       max_tokens=5, temperature=0, logprobs=True)
    assert c.choices[0].message.role == "assistant"
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                            max_tokens=5, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == c.choices[0].message.content


def test_sse_ends_with_done(server):
    base, _ = server
    with httpx.stream("POST", base + "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7],
                                                              "max_tokens": 3, "stream": True,
                                                              "ignore_eos": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [1] * (CONTEXT + 5)}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "n": 100}, 400, "n"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    base, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(base + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    assert httpx.get(base + "/health", timeout=10).status_code == 200  # still serving


def test_chat_errors(server):
    base, _ = server
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": "hello"}, timeout=30)
    assert r.status_code == 400


def test_full_queue_answers_503(parallel_tp1):
    """A bounded queue: with the engine paused and its queue full, a new request is refused with 503."""
    engine = Engine(make_model("llama_tiny", seed=32), max_batch_size=1, max_seq_len=64, max_queue=1)
    app = create_app(engine, MODEL, start_engine=False)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))  # fills the queue; nothing drains it

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/completions", json={"model": MODEL, "prompt": [4, 5], "max_tokens": 2})

    r = asyncio.run(go())
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"


def test_disconnect_mid_stream_frees_slot(server):
    base, engine = server
    aborted_before = _metric(base, "megatron_r1_aborted_requests_total")
    with httpx.stream("POST", base + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 100, "stream": True,
                            "ignore_eos": True}) as r:
        it = r.iter_lines()
        got = 0
        for ln in it:
            if ln.startswith("data: {"):
                got += 1
                if got == 2:
                    break
        assert engine.num_running >= 1
    # the connection is closed: the request is aborted and its slot freed well before 100 tokens
    deadline = time.time() + 30
    while engine.num_running or engine.num_waiting:
        assert time.time() < deadline, "slot not freed after the client disconnected"
        time.sleep(0.05)
    assert _metric(base, "megatron_r1_aborted_requests_total") == aborted_before + 1


def _metric(base, name):
    text = httpx.get(base + "/metrics", timeout=10).text
    for ln in text.splitlines():
        if ln.startswith(name + " "):
            return float(ln.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_64_concurrent_clients(server):
    """64 clients at once (completions, chat, streams): every response valid, bounded time, server alive."""
    base, engine = server

    async def one(c, i):
        kind = i % 3
        if kind == 0:
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"What is {i} plus 3?",
                                                      "max_tokens": 6, "seed": i})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            assert body["usage"]["completion_tokens"] >= 1
        elif kind == 1:
            r = await c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 6,
                                                           "messages": [{"role": "user", "content": f"{i} times 2"}]})
            assert r.status_code == 200, r.text
            assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        else:
            async with c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": [i + 3, 7], "stream": True,
                                                                 "max_tokens": 6}) as r:
                assert r.status_code == 200
                lines = [ln async for ln in r.aiter_lines() if ln]
            assert lines[-1] == "data: [DONE]"
            for ln in lines[:-1]:
                json.loads(ln[6:])
        return True

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    t0 = time.time()
    results = asyncio.run(asyncio.wait_for(main(), timeout=240))
    assert all(results) and len(results) == 64
    print(f"\n64 concurrent clients served in {time.time() - t0:.1f}s")
    assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
    assert engine.num_running == 0


def test_metrics_exposition(server):
    base, _ = server
    text = httpx.get(base + "/metrics", timeout=10).text
    for name in ("megatron_r1_requests_total", "megatron_r1_generation_tokens_total", "megatron_r1_queue_depth",
                 "megatron_r1_request_latency_seconds_bucket", "megatron_r1_request_latency_seconds_count",
                 "megatron_r1_prefill_tokens_shared_total"):
        assert name in text
    assert "# TYPE megatron_r1_request_latency_seconds histogram" in text
