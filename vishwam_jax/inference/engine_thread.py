"""An `Engine` on one background thread that owns the device; other threads talk to it through a
queue: submit a request with a callback for its events, cancel it, stop the thread.

The callback runs on the engine thread, once per event, in order; a request's last event has a
finish_reason. Callbacks must be quick (e.g. `loop.call_soon_threadsafe(queue.put_nowait, event)`).

`EngineHandle` is what the HTTP API needs of an engine. `EngineThread` is one, in the server's own
process; `engine_link.RemoteEngine` is one in another process, for an HTTP server that must not share
the engine thread's interpreter lock.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Hashable
from typing import Protocol

from prometheus_client import generate_latest

from vishwam_jax.inference.serving import Engine, Event, QueueFull, Request, RequestLimits, RequestRejected
from vishwam_jax.inference.serving_metrics import ServingMetrics

log = logging.getLogger(__name__)

OnEvent = Callable[[Event], None]

# The engine thread waits for each step with the interpreter lock released, and then has to win it
# back from the HTTP thread; by default a waiting thread asks for it only after 5 ms, a whole decode
# step of a large model.
GIL_SWITCH_INTERVAL_S = 0.0005


class ShuttingDown(RuntimeError):
    """The engine thread no longer accepts requests."""


class EngineHandle(Protocol):
    """An engine as the HTTP API drives it. `submit` calls `on_event` from a thread of the handle's
    own (never the caller's event loop), once per event, in order."""

    @property
    def limits(self) -> RequestLimits: ...

    @property
    def alive(self) -> bool: ...

    @property
    def failure(self) -> str | None:
        """Why the engine no longer runs ("stopped", or what killed it); None while it runs."""

    @property
    def queue_length(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    def start(self) -> None: ...

    def submit(self, request: Request, on_event: OnEvent) -> None:
        """Queue `request`; raises RequestRejected (never runnable), QueueFull or ShuttingDown."""

    def cancel(self, request_id: Hashable) -> None: ...

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout_s, cancel the rest."""

    async def metrics_text(self) -> bytes:
        """The Prometheus text exposition of the engine's metrics."""


class EngineThread:
    def __init__(
        self,
        engine: Engine,
        metrics: ServingMetrics | None = None,
        *,
        idle_wait_s: float = 0.05,
        after_events: Callable[[], None] | None = None,
    ):
        """after_events: called on the engine thread after each batch of events has gone to the
        callbacks (a step's, a cancellation's), so that a listener can hand them on as one batch."""
        self.engine = engine
        self._after_events = after_events
        self.metrics = metrics or ServingMetrics()
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[Hashable, OnEvent] = {}
        self._submitted_at: dict[Hashable, float] = {}
        self._last_token_at: dict[Hashable, float] = {}
        self._prompt_tokens_counted = 0
        self._pending_submits = 0  # in the inbox, not yet seen by the engine
        self._lock = threading.Lock()
        self._accepting = True
        self._drain_deadline: float | None = None
        self._thread = threading.Thread(target=self._loop, name="vishwam-engine", daemon=True)
        self.error: BaseException | None = None  # what killed the thread, if anything did

    # -- any thread --------------------------------------------------------------------------------
    def start(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        if self.alive:
            return None
        return "stopped" if self.error is None else f"engine failed: {self.error!r}"

    @property
    def limits(self) -> RequestLimits:
        return self.engine.limits

    @property
    def queue_length(self) -> int:
        return self.engine.num_waiting + self._pending_submits

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    async def metrics_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def submit(self, request: Request, on_event: OnEvent) -> None:
        """Queue `request`; raises RequestRejected (never runnable), QueueFull or ShuttingDown."""
        self.engine.check(request)
        with self._lock:
            if not self._accepting or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if self.queue_length >= self.engine.config.max_queue:
                raise QueueFull(f"{self.queue_length} requests are already waiting")
            self._pending_submits += 1
        self._inbox.put(("submit", request, on_event, time.monotonic()))

    def cancel(self, request_id: Hashable) -> None:
        """Stop a request and free its slot and pages (its last event says "cancelled"); a no-op
        for requests that have already finished."""
        self._inbox.put(("cancel", request_id))

    def stop(self, drain_timeout_s: float = 0.0, join_timeout_s: float | None = None) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout_s, cancel the rest,
        and end the thread."""
        with self._lock:
            self._accepting = False
        self._inbox.put(("stop", time.monotonic() + drain_timeout_s))
        if self.alive:
            self._thread.join(join_timeout_s)

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                self._drain_inbox(block=not self.engine.has_work and self._drain_deadline is None)
                if self._drain_deadline is not None and (
                    not self.engine.has_work or time.monotonic() >= self._drain_deadline
                ):
                    self._dispatch(self.engine.cancel_all())
                    self._fail_inbox()
                    return
                if self.engine.has_work:
                    try:
                        events = self.engine.step()
                    except Exception:  # the step's donated cache is gone: end every request, start clean
                        log.exception("engine step failed; ending every request")
                        events = self.engine.reset()
                    self._dispatch(events)
                self.metrics.observe_engine(self.engine)
        except BaseException as err:  # keep the reason for /health; the server reports it
            self.error = err
            log.exception("engine thread died")
            raise
        finally:
            with self._lock:
                self._accepting = False

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            _, request, on_event, submitted_at = message
            with self._lock:
                self._pending_submits -= 1
            try:
                self.engine.submit(request)
            except (RequestRejected, QueueFull):  # raced past submit()'s checks
                on_event(Event(request.id, None, 0, "", "rejected"))
                self._events_handed_on()
                return
            self._listeners[request.id] = on_event
            self._submitted_at[request.id] = submitted_at
        elif kind == "cancel":
            event = self.engine.cancel(message[1])
            if event is not None:
                self._dispatch([event])
        elif kind == "stop":
            self._drain_deadline = message[1]

    def _fail_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                message[2](Event(message[1].id, None, 0, "", "cancelled"))
                self._events_handed_on()

    def _dispatch(self, events: list[Event]) -> None:
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens.inc(sum(e.token is not None for e in events))
        for e in events:
            if e.token is not None:
                if e.index == 0:
                    m.ttft.observe(now - self._submitted_at.get(e.request_id, now))
                else:
                    m.inter_token.observe(now - self._last_token_at.get(e.request_id, now))
                self._last_token_at[e.request_id] = now
            listener = self._listeners.get(e.request_id)
            if e.finish_reason is not None:
                m.finished.labels(e.finish_reason).inc()
                self._listeners.pop(e.request_id, None)
                self._submitted_at.pop(e.request_id, None)
                self._last_token_at.pop(e.request_id, None)
            if listener is not None:
                try:
                    listener(e)
                except Exception:  # one client's broken callback must not stop the others
                    log.exception("event callback failed for request %r", e.request_id)
        m.prompt_tokens.inc(self.engine.prompt_tokens - self._prompt_tokens_counted)
        self._prompt_tokens_counted = self.engine.prompt_tokens
        if events:
            self._events_handed_on()

    def _events_handed_on(self) -> None:
        if self._after_events is not None:
            self._after_events()
