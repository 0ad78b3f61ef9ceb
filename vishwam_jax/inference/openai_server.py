"""An OpenAI-compatible HTTP API over an engine (FastAPI; run it with uvicorn, see serve.py): an
`EngineThread` in this process, or an `engine_link.RemoteEngine` for an engine in another.

    POST /v1/completions, /v1/chat/completions   JSON, or server-sent events with "stream": true
    GET  /v1/models, /health, /metrics (Prometheus text format)

Handlers run on the asyncio loop and never touch the device: each request gets an asyncio.Queue that
the engine's thread fills through `loop.call_soon_threadsafe`. A client that goes away (a closed
stream, or a dropped connection while waiting for a whole answer) cancels its request, which frees
its slot and cache pages at the engine's next step. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 for invalid requests (malformed JSON, missing
fields, out-of-range values, too long for the context), 429 when the wait queue is full, 503 while
shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from vishwam_jax.inference.chat_template import ChatTemplate
from vishwam_jax.inference.engine_thread import EngineHandle, ShuttingDown
from vishwam_jax.inference.openai_protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from vishwam_jax.inference.sampling import SamplingParams
from vishwam_jax.inference.serving import Event, QueueFull, RequestRejected
from vishwam_jax.inference.serving import Request as EngineRequest

# How often a handler waiting for a whole (non-streamed) answer checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _failure(reason: str) -> ApiError:
    """The error for a request that ended without finishing its answer."""
    if reason == "rejected":
        return ApiError(429, "the server's request queue is full; retry later", "rate_limit_error")
    if reason == "cancelled":
        return ApiError(503, "the request was cancelled (the server is shutting down)", "server_error")
    return ApiError(500, "the engine failed while running this request", "server_error")


def create_app(
    engine: EngineHandle,
    *,
    tokenizer,
    model_name: str,
    chat_template: ChatTemplate | None = None,
    default_max_tokens: int = 256,
    drain_timeout_s: float = 10.0,
) -> FastAPI:
    """The app; its lifespan starts the engine (if not yet started) and stops it on shutdown,
    letting in-flight requests finish for up to drain_timeout_s before cancelling them."""
    limits = engine.limits
    chat_template = chat_template or ChatTemplate()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_timeout_s)

    app = FastAPI(title="vishwam_jax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse(error_body(message or "invalid request", param=where), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(error_body(err.message, err.kind, err.param), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    # -- requests into the engine ------------------------------------------------------------------
    def engine_request(request_id: str, prompt: list[int], body: SamplingFields, limit: int | None) -> EngineRequest:
        if tokenizer is None and body.stop_strings:
            raise ApiError(400, "stop strings need a tokenizer", param="stop")
        max_tokens = limit or max(1, min(default_max_tokens, limits.max_len - len(prompt)))
        return EngineRequest(
            id=request_id,
            prompt=tuple(prompt),
            max_tokens=max_tokens,
            sampling=SamplingParams(body.temperature, body.top_k, None if body.top_p == 1.0 else body.top_p),
            seed=secrets.randbits(32) if body.seed is None else body.seed,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            stop=body.stop_strings,
            ignore_eos=body.ignore_eos,
        )

    def wants_token_ids(body: SamplingFields) -> bool:
        # Without a tokenizer the text is empty: the ids are the answer.
        return body.return_token_ids or tokenizer is None

    mailbox: _Mailbox | None = None

    def submit(request: EngineRequest) -> asyncio.Queue:
        nonlocal mailbox
        if mailbox is None:
            mailbox = _Mailbox(asyncio.get_running_loop())
        events: asyncio.Queue = asyncio.Queue()
        post = mailbox.post
        try:
            engine.submit(request, lambda event: post(events, event))
        except RequestRejected as err:
            raise ApiError(400, str(err)) from None
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}", "rate_limit_error") from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), "server_error") from None
        return events

    async def whole_answer(request: EngineRequest, events: asyncio.Queue, http: Request) -> tuple[str, list[int], str]:
        """(text, generated token ids, finish reason); cancels the request if the client goes away."""
        parts, ids = [], []
        try:
            while True:
                try:
                    event: Event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http.is_disconnected():
                        return "".join(parts), ids, "cancelled"
                    continue
                parts.append(event.text)
                if event.token is not None:
                    ids.append(event.token)
                if event.finish_reason is not None:
                    if event.finish_reason not in ("stop", "length"):
                        raise _failure(event.finish_reason)
                    return "".join(parts), ids, event.finish_reason
        finally:
            engine.cancel(request.id)  # a no-op once finished

    async def event_stream(
        request: EngineRequest, events: asyncio.Queue, chunk: Callable[[Event], dict | None]
    ) -> AsyncIterator[str]:
        """Server-sent events; closing the stream (a client that disconnects) cancels the request.
        Events that queued up while the stream was behind go out in one write."""
        try:
            finished = False
            while not finished:
                parts = []
                for event in await _waiting_events(events):
                    if event.finish_reason is not None and event.finish_reason not in ("stop", "length"):
                        err = _failure(event.finish_reason)
                        parts.append(f"data: {json.dumps(error_body(err.message, err.kind))}\n\n")
                        finished = True
                        break
                    body = chunk(event)
                    if body is not None:
                        parts.append(f"data: {json.dumps(body)}\n\n")
                    if event.finish_reason is not None:
                        finished = True
                        break
                if parts:
                    yield "".join(parts)
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(request.id)

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return tokenizer.encode(text)

    def usage(prompt: list[int], completion: int) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}

    # -- routes ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        prompt = body.prompt
        ids = encode(prompt if isinstance(prompt, str) else prompt[0]) if _is_text(prompt) else list(prompt)
        request = engine_request(f"cmpl-{uuid.uuid4().hex}", ids, body, body.max_tokens)
        events = submit(request)
        created = int(time.time())
        base = {"id": request.id, "object": "text_completion", "created": created, "model": model_name}
        with_ids = wants_token_ids(body)
        if body.stream:

            def chunk(e: Event) -> dict | None:
                if not e.text and e.finish_reason is None and not (with_ids and e.token is not None):
                    return None
                choice = {"index": 0, "text": e.text, "logprobs": None, "finish_reason": e.finish_reason}
                if with_ids:
                    choice["token_ids"] = [] if e.token is None else [e.token]
                return {**base, "choices": [choice]}

            return StreamingResponse(event_stream(request, events, chunk), media_type="text/event-stream")
        text, generated, reason = await whole_answer(request, events, http)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if with_ids:
            choice["token_ids"] = generated
        return {**base, "choices": [choice], "usage": usage(ids, len(generated))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        try:
            text = chat_template.render([{"role": m.role, "content": m.text} for m in body.messages])
        except Exception as err:  # a template's raise_exception, or a broken template
            raise ApiError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        ids = encode(text)
        request = engine_request(f"chatcmpl-{uuid.uuid4().hex}", ids, body, body.output_limit)
        events = submit(request)
        base = {"id": request.id, "created": int(time.time()), "model": model_name}
        with_ids = wants_token_ids(body)
        if body.stream:
            started = False

            def chunk(e: Event) -> dict | None:
                nonlocal started
                if not e.text and e.finish_reason is None and started and not (with_ids and e.token is not None):
                    return None
                delta = {"content": e.text} if e.text else {}
                if not started:
                    delta, started = {"role": "assistant", **delta}, True
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": e.finish_reason}
                if with_ids:
                    choice["token_ids"] = [] if e.token is None else [e.token]
                return {**base, "object": "chat.completion.chunk", "choices": [choice]}

            return StreamingResponse(event_stream(request, events, chunk), media_type="text/event-stream")
        answer, generated, reason = await whole_answer(request, events, http)
        message = {"role": "assistant", "content": answer}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        if with_ids:
            choice["token_ids"] = generated
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage(ids, len(generated))}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vishwam_jax"}]}

    @app.get("/health")
    async def health():
        failure = engine.failure
        if failure is None:
            return {"status": "ok", "running": engine.num_running, "waiting": engine.queue_length}
        return JSONResponse({"status": failure}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(await engine.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Mailbox:
    """Events from the engine thread into the loop's queues, with one wakeup of the loop per batch.

    A step ends with an event for every running stream; handing each over with its own
    `call_soon_threadsafe` wakes the loop (a write to its self-pipe) once per event, and every wakeup
    is interpreter-lock time taken from the engine thread. The first event posted schedules a flush
    and the others join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:  # on the engine thread
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a flush is already scheduled and has not run yet
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # on the loop
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


async def _waiting_events(events: asyncio.Queue) -> list[Event]:
    """The next event, and every other one already queued."""
    out = [await events.get()]
    while not events.empty():
        out.append(events.get_nowait())
    return out


def _is_text(prompt) -> bool:
    return isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], str))


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, startup_s: float = 60.0) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve `app` with uvicorn on an ephemeral localhost port in a background thread (benchmarks and
    tests); yields the base URL and the server, and stops it (as Ctrl-C would) on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(startup_s)
        if thread.is_alive():
            raise RuntimeError("the server did not stop")
