"""The engine and the HTTP server in two processes, linked by a pipe.

In one process, the engine thread and uvicorn's event loop share one interpreter lock. With 64
streams of gemma-2b on an H100, a decode step takes 2.9 ms of the GPU, and the host work behind it
(the engine's bookkeeping, and an SSE write per stream) took 4.5 ms of CPU between the two threads:
tokens reached the clients in bursts (BENCHMARKS.md, "Serving"). As in vLLM and SGLang, the HTTP
server can run in a process of its own instead, which never touches the model or the device.
`serve_in_process` starts that process (spawned, so that it inherits no device state) and joins it
to an `EngineThread` in this one; there, `RemoteEngine` is the `EngineHandle` the app drives.

Messages (pickled tuples):
    HTTP -> engine   ("submit", Request)  ("cancel", id)  ("metrics", ticket)  ("stop", drain_timeout_s)
                     ("listening", url)
    engine -> HTTP   ("events", [event fields], status)  ("status", status)  ("metrics", ticket, text)
                     ("stopped",)
All of a step's events cross in one message. Each status says how many submits the engine has
taken, its queue length, its running requests and why it stopped (None while it runs), so that the
HTTP side answers 429 and /health without a round trip; the engine side sends one at least every
STATUS_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Hashable, Iterator
from multiprocessing.connection import Connection
from typing import NamedTuple

import uvicorn
from prometheus_client import generate_latest

from vishwam_jax.inference.chat_template import ChatTemplate
from vishwam_jax.inference.engine_thread import EngineHandle, EngineThread, OnEvent, ShuttingDown
from vishwam_jax.inference.openai_server import create_app
from vishwam_jax.inference.serving import Engine, Event, QueueFull, Request, RequestLimits, RequestRejected
from vishwam_jax.inference.serving_metrics import ServingMetrics

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.1


class Status(NamedTuple):
    submits_taken: int  # submit messages the engine side has handed to its engine thread
    queue_length: int
    num_running: int
    failure: str | None  # EngineHandle.failure


# -- the engine's process ---------------------------------------------------------------------------
class EngineBridge:
    """The engine's end of the pipe: requests from the HTTP process into an `EngineThread`, and its
    events back, one message per step. Three threads of this process: the engine thread, a reader
    of the pipe and its only writer."""

    def __init__(self, engine: Engine, conn: Connection, metrics: ServingMetrics | None = None):
        self.engine_thread = EngineThread(engine, metrics, after_events=self._events_done)
        self._conn = conn
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._step_events: list[tuple] = []  # the engine thread's, until its batch is done
        self._submits_taken = 0
        self.listening = threading.Event()
        self.url: str | None = None
        self._reader = threading.Thread(target=self._read, name="engine-link-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="engine-link-writer", daemon=True)

    def start(self) -> None:
        self.engine_thread.start()
        self._reader.start()
        self._writer.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread (cancelling what still runs) and both pipe threads."""
        self.engine_thread.stop(0.0, join_timeout_s=timeout_s)
        self._outbox.put(None)
        self._writer.join(timeout_s)
        self._conn.close()
        self._reader.join(timeout_s)

    def _status(self) -> Status:
        t = self.engine_thread
        return Status(self._submits_taken, t.queue_length, t.num_running, t.failure)

    # -- the engine thread ---------------------------------------------------------------------------
    def _on_event(self, e: Event) -> None:
        self._step_events.append((e.request_id, e.token, e.index, e.text, e.finish_reason))

    def _events_done(self) -> None:
        batch, self._step_events = self._step_events, []
        self._outbox.put(("events", batch, self._status()))

    # -- the reader ----------------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "submit":
                    self._submit(message[1])
                elif kind == "cancel":
                    self.engine_thread.cancel(message[1])
                elif kind == "metrics":
                    self._outbox.put(("metrics", message[1], generate_latest(self.engine_thread.metrics.registry)))
                elif kind == "stop":
                    threading.Thread(target=self._stop, args=(message[1],), name="engine-link-stop").start()
                elif kind == "listening":
                    self.url = message[1]
                    self.listening.set()
        except (EOFError, OSError):  # the HTTP process has gone: nobody is left to answer
            self.engine_thread.stop(0.0)
            self._outbox.put(None)

    def _submit(self, request: Request) -> None:
        # Counted before the engine thread's queue holds it: a status in between undercounts by one
        # for a moment (the engine thread's own check still holds the line) rather than double counts.
        self._submits_taken += 1
        try:
            self.engine_thread.submit(request, self._on_event)
            return
        except (RequestRejected, QueueFull):  # raced past the HTTP side's checks
            reason = "rejected"
        except ShuttingDown:
            reason = "cancelled"
        self._outbox.put(("events", [(request.id, None, 0, "", reason)], self._status()))

    def _stop(self, drain_timeout_s: float) -> None:
        self.engine_thread.stop(drain_timeout_s)
        self._outbox.put(("stopped",))

    # -- the writer ----------------------------------------------------------------------------------
    def _write(self) -> None:
        try:
            while True:
                try:
                    message = self._outbox.get(timeout=STATUS_INTERVAL_S)
                except queue.Empty:
                    message = ("status", self._status())
                if message is None:
                    return
                self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            return


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """What the HTTP process needs (pickled into it): no model, no device state."""

    host: str
    port: int  # 0: any free port (the URL is reported back)
    model_name: str
    limits: RequestLimits
    tokenizer: object | None  # picklable (the package's tokenizers are)
    chat_template_dir: str | None
    default_max_tokens: int
    drain_timeout_s: float
    log_level: str = "info"

    def app(self, engine: EngineHandle):
        """The FastAPI app over `engine`, in whichever process serves it."""
        return create_app(
            engine,
            tokenizer=self.tokenizer,
            model_name=self.model_name,
            chat_template=ChatTemplate.from_directory(self.chat_template_dir),
            default_max_tokens=self.default_max_tokens,
            drain_timeout_s=self.drain_timeout_s,
        )


@dataclasses.dataclass
class HttpProcess:
    url: str
    process: multiprocessing.Process
    bridge: EngineBridge

    def wait(self) -> int:
        """Wait for the HTTP process to end; its exit code. Ctrl-C (SIGINT) and SIGTERM here are
        passed on to it (in a process group of its own, it gets neither from the terminal): it
        stops accepting, drains running requests and exits; a second Ctrl-C ends it at once."""
        previous = signal.signal(signal.SIGTERM, lambda *_: self.process.terminate())
        try:
            while self.process.is_alive():
                try:
                    self.process.join()
                except KeyboardInterrupt:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.process.pid, signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.process.exitcode


@contextlib.contextmanager
def serve_in_process(
    engine: Engine, settings: HttpSettings, metrics: ServingMetrics | None = None, startup_s: float = 120.0
) -> Iterator[HttpProcess]:
    """Serve `engine` from an `EngineThread` here, with the HTTP API in a child process; yields once
    it listens. On exit the child is asked to shut down (SIGTERM: it drains for up to
    settings.drain_timeout_s), and the engine thread is stopped."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    bridge = EngineBridge(engine, ours, metrics)
    process = context.Process(target=_http_main, args=(theirs, settings), name="vishwam-http", daemon=True)
    process.start()
    theirs.close()
    bridge.start()
    try:
        deadline = time.monotonic() + startup_s
        while not bridge.listening.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the HTTP server did not start on {settings.host}:{settings.port} (its log above says why)"
                )
        yield HttpProcess(bridge.url, process, bridge)
    finally:
        if process.is_alive():
            process.terminate()
            process.join(settings.drain_timeout_s + 30.0)
        if process.is_alive():
            process.kill()
            process.join()
        bridge.close()


# -- the HTTP process -------------------------------------------------------------------------------
class RemoteEngine:
    """The `EngineHandle` of an engine in another process, over the HTTP end of the pipe."""

    def __init__(self, conn: Connection, limits: RequestLimits):
        self.limits = limits
        self._conn = conn
        self._send_lock = threading.Lock()  # the loop and shutdown's worker thread both send
        self._lock = threading.Lock()
        self._listeners: dict[Hashable, OnEvent] = {}
        self._submits_sent = 0
        self._status = Status(0, 0, 0, None)
        self._accepting = True
        self._stopped = threading.Event()
        self._lost = False
        self._tickets = itertools.count()
        self._metrics_waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._reader = threading.Thread(target=self._read, name="engine-link", daemon=True)
        self.on_lost = lambda: None  # called (on the reader) if the engine's process goes away

    # -- EngineHandle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._reader.ident is None:  # a thread starts once
            self._reader.start()

    @property
    def alive(self) -> bool:
        return self.failure is None

    @property
    def failure(self) -> str | None:
        if self._lost:
            return "the engine's process has gone"
        if self._reader.ident is None:
            return "not started"
        if self._status.failure is not None or self._stopped.is_set():
            return self._status.failure or "stopped"
        return None

    @property
    def queue_length(self) -> int:
        """The engine's queue as last reported, plus the submits sent since: a burst of arrivals
        counts as waiting until the next status says where each went (at most a step later), so
        429s come early rather than late."""
        status = self._status
        return status.queue_length + self._submits_sent - status.submits_taken

    @property
    def num_running(self) -> int:
        return self._status.num_running

    def submit(self, request: Request, on_event: OnEvent) -> None:
        self.limits.check(request)
        with self._lock:
            if not self._accepting or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if self.queue_length >= self.limits.max_queue:
                raise QueueFull(f"{self.queue_length} requests are already waiting")
            self._listeners[request.id] = on_event
            self._submits_sent += 1
            self._send(("submit", request))

    def cancel(self, request_id: Hashable) -> None:
        self._send(("cancel", request_id))

    def report_listening(self, url: str) -> None:
        self._send(("listening", url))

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        with self._lock:
            self._accepting = False
        self._send(("stop", drain_timeout_s))
        self._stopped.wait(drain_timeout_s + 30.0)

    async def metrics_text(self) -> bytes:
        loop = asyncio.get_running_loop()
        ticket, answer = next(self._tickets), loop.create_future()
        self._metrics_waiters[ticket] = (loop, answer)
        try:
            self._send(("metrics", ticket))
            return await asyncio.wait_for(answer, 10.0)
        finally:
            self._metrics_waiters.pop(ticket, None)

    # -- the pipe ------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock, contextlib.suppress(BrokenPipeError, EOFError, OSError):
            self._conn.send(message)

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "events":
                    self._deliver(message[1])
                    self._status = message[2]
                elif kind == "status":
                    self._status = message[1]
                elif kind == "metrics":
                    waiter = self._metrics_waiters.get(message[1])
                    if waiter is not None:
                        loop, answer = waiter
                        loop.call_soon_threadsafe(_resolve, answer, message[2])
                elif kind == "stopped":
                    self._stopped.set()
        except (EOFError, OSError):
            self._lost = True
            self._stopped.set()
            self._deliver([(request_id, None, 0, "", "error") for request_id in list(self._listeners)])
            self.on_lost()

    def _deliver(self, batch: list[tuple]) -> None:
        for fields in batch:
            event = Event(*fields)
            if event.finish_reason is None:
                listener = self._listeners.get(event.request_id)
            else:
                listener = self._listeners.pop(event.request_id, None)
            if listener is not None:
                try:
                    listener(event)
                except Exception:  # one client's broken callback must not stop the others
                    log.exception("event callback failed for request %r", event.request_id)


def _resolve(answer: asyncio.Future, value) -> None:
    if not answer.done():
        answer.set_result(value)


def _http_main(conn: Connection, settings: HttpSettings) -> None:
    """The HTTP process: the app over a RemoteEngine, under uvicorn (which handles Ctrl-C and
    SIGTERM: stop accepting, drain, exit)."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # nothing here computes: never claim the accelerator
    if hasattr(os, "setpgid"):  # the terminal's Ctrl-C goes to the engine's process, which passes it on once
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    remote = RemoteEngine(conn, settings.limits)
    app = settings.app(remote)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 1,
    )
    server = uvicorn.Server(config)

    def on_lost() -> None:
        log.error("the engine's process has gone; shutting down")
        server.should_exit = True

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        remote.report_listening(f"http://{host}:{port}")

    remote.on_lost = on_lost
    threading.Thread(target=announce, name="announce", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises Ctrl-C again once it has shut down
        server.run()
