"""The OpenAI-compatible server: completions and chat (whole and streamed) equal the engine's greedy
tokens, /health and /metrics, HTTP 400 with an OpenAI error body for bad input, a client that
disconnects mid-stream frees its pages, a full queue answers 429 without disturbing other streams,
and shutdown ends the engine thread; the same with the HTTP server in a process of its own, and
that side's behaviour when the engine's process dies. Localhost only (TestClient, or uvicorn on an
ephemeral port), every wait bounded."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import vishwam_jax as vj
from vishwam_jax.inference.engine_link import HttpSettings, RemoteEngine, Status, serve_in_process
from vishwam_jax.inference.engine_thread import EngineThread, ShuttingDown
from vishwam_jax.inference.openai_server import create_app, serve_in_thread
from vishwam_jax.inference.serving import Engine, EngineConfig, Request, RequestLimits, RequestRejected

PROMPT = "ROMEO.\nBut soft, what light"


@pytest.fixture(scope="module")
def engine():
    model = vj.load("gemma-shakespeare", dtype=np.float32)
    # 4 slots, 6 pages of 64 tokens (a 128-token request takes 2), at most 2 waiting
    config = EngineConfig(num_slots=4, max_len=128, prefill_rows=2, chunk_buckets=(32,), num_pages=6, max_queue=2)
    engine = Engine(model, config, tokenizer=model.tokenizer)
    engine.warmup()
    return engine


def make_app(engine):
    return create_app(EngineThread(engine), tokenizer=engine.tokenizer, model_name="shakespeare", drain_timeout_s=2.0)


def greedy_text(engine, prompt: str, n: int) -> str:
    tokens = engine.run([Request("ref", tuple(engine.tokenizer.encode(prompt)), n)])["ref"]
    return engine.tokenizer.decode([t for t in tokens if t not in engine.eos_ids])


def sse_payloads(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture
def client(engine):  # one engine thread per test: the engine must never have two owners
    expected = greedy_text(engine, PROMPT, 12)  # before the engine thread owns the engine
    with TestClient(make_app(engine)) as c:
        c.expected = expected
        yield c


def test_completion_and_chat_whole_and_streamed(client):
    body = {"model": "x", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == client.expected
    assert out["usage"]["prompt_tokens"] == len(PROMPT.encode()) and out["choices"][0]["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == client.expected
    chat = {"messages": [{"role": "user", "content": "Speak."}], "max_tokens": 5, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=chat) as r:
        events = sse_payloads(r.iter_lines())
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    whole = client.post("/v1/chat/completions", json={**chat, "stream": False}).json()
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert whole["choices"][0]["message"]["content"] == streamed and whole["usage"]["completion_tokens"] == 5


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"prompt": "HAMLET.", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text
    for name in (
        "vishwam_queue_length",
        "vishwam_running_requests",
        "vishwam_cache_pages_used",
        "vishwam_generation_tokens_per_second",
        "vishwam_time_to_first_token_seconds_bucket",
        "vishwam_generation_tokens_total",
    ):
        assert name in text
    assert 'vishwam_requests_finished_total{reason="length"}' in text


@pytest.mark.parametrize(
    "body, param",
    [
        ("{not json", None),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "a", "temperature": -0.5}, "temperature"),
        ({"prompt": "a", "temperature": 2.5}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": 0}, "top_k"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10_000}, None),  # past the context
        ({"prompt": "a" * 200, "max_tokens": 4}, None),  # prompt longer than the context
        ({"prompt": [1, 2, 99_999], "max_tokens": 4}, None),  # token ids outside the vocabulary
        ({"prompt": "a", "n": 2}, None),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, None),
        ([1, 2, 3], None),
    ],
)
def test_bad_input_is_a_400_with_an_openai_error_body(client, body, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {}
    r = client.post("/v1/completions", **(kwargs or {"json": body}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert param in error["param"]
    assert client.get("/health").json()["status"] == "ok"


def test_chat_without_messages_is_a_400(client):
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# -- a real server on an ephemeral port ----------------------------------------------------------------
def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def check_disconnect_and_full_queue(engine, url: str, expected: str) -> None:
    """A client that goes away mid-stream frees its pages; ten requests at once on a queue of two get
    200 or 429, and every stream that ran is intact."""
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
    # A client reads two events of a stream and goes away: its request ends, its pages come back.
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**body, "max_tokens": 90}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    wait_until(lambda: engine.pages_used == 0)
    wait_until(lambda: 'vishwam_requests_finished_total{reason="cancelled"} 1.0' in httpx.get(f"{url}/metrics").text)

    # 10 at once: at most 2 may wait for a slot (3 fit the 6 pages), the others get 429 at once;
    # every stream that ran is intact.
    async def one(client: httpx.AsyncClient):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.json()
            return 200, sse_payloads([line async for line in r.aiter_lines()])

    async def many():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(10)))

    results = asyncio.run(many())
    codes = sorted(code for code, _ in results)
    assert codes.count(200) >= 2 and set(codes) <= {200, 429} and 429 in codes
    for code, payload in results:
        if code == 200:
            assert "".join(e["choices"][0]["text"] for e in payload[:-1]) == expected
        else:
            assert payload["error"]["type"] == "rate_limit_error"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    wait_until(lambda: engine.pages_used == 0)


def test_disconnect_frees_pages_and_a_full_queue_gets_429_without_corrupting_streams(engine):
    expected = greedy_text(engine, PROMPT, 40)
    with serve_in_thread(make_app(engine)) as (url, _):
        check_disconnect_and_full_queue(engine, url, expected)


def http_settings(engine, **kw) -> HttpSettings:
    """`serve`'s settings for the embedded model on localhost (port, drain and log level from kw)."""
    return HttpSettings(
        host="127.0.0.1",
        model_name="shakespeare",
        limits=engine.limits,
        tokenizer=engine.tokenizer,
        chat_template_dir=None,
        default_max_tokens=16,
        **kw,
    )


def test_the_http_server_in_its_own_process(engine):
    """`serve`'s layout: the app in a spawned process over a pipe to the engine thread here. Greedy
    answers, /health and /metrics, disconnects and 429s as in one process; SIGTERM drains the
    running request before the engine thread stops."""
    expected = greedy_text(engine, PROMPT, 40)
    settings = http_settings(engine, port=0, drain_timeout_s=20.0, log_level="warning")
    with serve_in_process(engine, settings) as http:
        url = http.url
        whole = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0})
        assert whole.json()["choices"][0]["text"] == expected
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "running": 0, "waiting": 0}
        assert 'vishwam_requests_finished_total{reason="length"} 1.0' in httpx.get(f"{url}/metrics").text
        check_disconnect_and_full_queue(engine, url, expected)

        result = {}

        def request():
            body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                result["events"] = sse_payloads(list(r.iter_lines()))

        client = threading.Thread(target=request)
        client.start()
        wait_until(lambda: engine.num_running == 1)
        http.process.terminate()  # as `kill` would: stop accepting, let the running request finish
        client.join(60)
        http.process.join(60)
    assert "".join(e["choices"][0]["text"] for e in result["events"][:-1]) == expected
    assert not http.bridge.engine_thread.alive and engine.pages_used == 0 and not engine.has_work


def test_an_http_process_that_cannot_bind_is_a_runtime_error_naming_the_address(engine):
    """The port taken between serve's own check and the HTTP process's bind: the context manager
    says so instead of waiting on a server that never starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = http_settings(engine, port=port, drain_timeout_s=1.0, log_level="critical")
        with pytest.raises(RuntimeError, match=f"did not start on 127.0.0.1:{port}"):
            with serve_in_process(engine, settings):
                pass


def test_shutdown_finishes_in_flight_requests_and_stops_the_engine_thread(engine):
    engine_thread = EngineThread(engine)
    app = create_app(engine_thread, tokenizer=engine.tokenizer, model_name="s", drain_timeout_s=10.0)
    expected = greedy_text(engine, PROMPT, 30)
    result = {}
    with serve_in_thread(app) as (url, server):

        def request():
            body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
            result["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        client = threading.Thread(target=request)
        client.start()
        wait_until(lambda: engine.num_running == 1)
        server.should_exit = True  # like Ctrl-C: stop accepting, let the running request finish
        client.join(60)
    assert result["response"].status_code == 200
    assert result["response"].json()["choices"][0]["text"] == expected
    assert not engine_thread.alive and engine.pages_used == 0 and not engine.has_work


def test_a_lost_engine_process_ends_every_stream_and_fails_health():
    """The HTTP side of the pipe when the engine's process dies: every open request ends with an
    error event, /health reports the failure, and the server is told to shut down."""
    ours, theirs = multiprocessing.Pipe()
    limits = RequestLimits(vocab_size=256, max_len=64, num_pages=4, has_tokenizer=False, max_queue=2)
    remote = RemoteEngine(ours, limits)
    lost, events = threading.Event(), []
    remote.on_lost = lost.set
    assert remote.failure == "not started"
    remote.start()
    remote.submit(Request("a", (1, 2, 3), 4), events.append)
    assert theirs.recv()[0] == "submit"
    theirs.send(("events", [("a", 7, 0, "", None)], Status(1, 0, 1, None)))
    wait_until(lambda: len(events) == 1)
    assert remote.alive and remote.num_running == 1 and remote.queue_length == 0
    with pytest.raises(RequestRejected):  # checked here, before anything crosses the pipe
        remote.submit(Request("b", (1, 2, 3), 100), events.append)
    theirs.close()
    assert lost.wait(10)
    assert [(e.request_id, e.token, e.finish_reason) for e in events] == [("a", 7, None), ("a", None, "error")]
    assert remote.failure == "the engine's process has gone"
    with pytest.raises(ShuttingDown):
        remote.submit(Request("c", (1, 2, 3), 4), events.append)
