"""Soak test of `python -m vishwam_jax.serve`: random request mixes and random client disconnects for
M minutes, then the cache must be empty.

    python scripts/soak_serving.py --minutes 10 --launch          # starts the default server itself
    python scripts/soak_serving.py --minutes 10 --url http://127.0.0.1:8000

K concurrent clients send, until the time is up, requests drawn at random: completions or chat,
streamed or whole, prompt and output lengths, greedy or sampled (temperature, top_p, top_k, seed),
sometimes stop strings, a few invalid ones (which must get 400); a share of them disconnect part-way
(a stream closed after a random number of chunks, or a whole answer abandoned by a short timeout).
/health is polled throughout. At the end, once the server is idle, /metrics must show no cache pages
in use, nothing running and nothing queued. With --launch the server is then stopped like Ctrl-C and
must exit cleanly. Exit status 1 on any leak, 5xx, broken stream, unexpected status or failed health
check; the summary (--json) counts requests served, disconnects and the pages in use at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen, beside this file
import loadgen

HEALTH_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Tally:
    served: int = 0  # answers that ran to a stop or to max_tokens
    disconnects: int = 0  # requests the client abandoned part-way
    rejected_as_expected: int = 0  # invalid requests answered 400
    busy: int = 0  # 429: the wait queue was full
    health_checks: int = 0
    max_pages_used: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:  # the first ones tell the story
            self.failures.append(message)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One random request: where it goes, its body, and how the client behaves."""

    path: str
    body: dict
    invalid: bool  # must be answered 400
    disconnect_after: int | None  # chunks to read before closing a stream (None: read it all)
    abandon_after_s: float | None  # a whole answer given up after this long (None: wait for it)


def random_body(rng: random.Random, corpus: str, chat: bool, max_prompt_chars: int, max_output: int) -> dict:
    n = rng.randint(1, max_prompt_chars)
    start = rng.randrange(len(corpus) - n)
    text = corpus[start : start + n]
    body: dict = {"max_tokens": rng.randint(1, max_output)}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "Answer in verse."})
    else:
        body["prompt"] = text
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.5, 0.8, 1.0, 1.3])
        if rng.random() < 0.5:
            body["top_p"] = rng.uniform(0.3, 1.0)
        if rng.random() < 0.5:
            body["top_k"] = rng.randint(1, 100)
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["\n\n", ".", "the", "KING"], rng.randint(1, 2))
    return body


def invalid_body(rng: random.Random) -> dict:
    return rng.choice(
        [
            {"prompt": "a", "temperature": -1},
            {"prompt": "a", "top_p": 0},
            {"prompt": "a", "max_tokens": 10**6},
            {"prompt": "a", "n": 3},
            {"max_tokens": 4},
            {"prompt": [1, 2, 10**7], "max_tokens": 4},
        ]
    )


def random_plan(rng: random.Random, corpus: str, args) -> Plan:
    chat = rng.random() < 0.3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if rng.random() < args.invalid_share:
        return Plan("/v1/completions", invalid_body(rng), True, None, None)
    body = random_body(rng, corpus, chat, args.max_prompt_chars, args.max_output)
    body["stream"] = rng.random() < 0.7
    disconnect = rng.random() < args.disconnect_share
    if body["stream"]:
        after = rng.randint(0, body["max_tokens"]) if disconnect else None
        return Plan(path, body, False, after, None)
    return Plan(path, body, False, None, rng.uniform(0.05, 1.0) if disconnect else None)


def chunk_finish(payload: dict) -> str | None:
    return payload["choices"][0].get("finish_reason")


async def streamed(client: httpx.AsyncClient, plan: Plan, tally: Tally) -> None:
    async with client.stream("POST", plan.path, json=plan.body) as r:
        if r.status_code != 200:
            await r.aread()
            check_status(r.status_code, r.text, plan, tally)
            return
        chunks, finish, done = 0, None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            payload = json.loads(line[6:])
            if "error" in payload:
                tally.fail(f"stream error: {payload['error']['message']}")
                return
            finish = chunk_finish(payload) or finish
            chunks += 1
            if plan.disconnect_after is not None and chunks >= plan.disconnect_after and finish is None:
                tally.disconnects += 1
                return  # leaving the block closes the connection mid-stream
        if not done or finish not in ("stop", "length"):
            tally.fail(f"stream ended without [DONE] or a finish reason ({finish!r})")
            return
        tally.served += 1


async def whole(client: httpx.AsyncClient, plan: Plan, tally: Tally) -> None:
    timeout = httpx.Timeout(600.0) if plan.abandon_after_s is None else httpx.Timeout(plan.abandon_after_s)
    try:
        r = await client.post(plan.path, json=plan.body, timeout=timeout)
    except httpx.TimeoutException:
        if plan.abandon_after_s is None:
            raise
        tally.disconnects += 1
        return
    if r.status_code != 200:
        check_status(r.status_code, r.text, plan, tally)
        return
    if r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
        tally.fail(f"whole answer without a finish reason: {r.text[:200]}")
        return
    tally.served += 1


def check_status(status: int, text: str, plan: Plan, tally: Tally) -> None:
    """A non-200 answer: 400 for invalid requests, 429 when busy; anything else is a failure."""
    if plan.invalid and status == 400:
        tally.rejected_as_expected += 1
    elif status == 429:
        tally.busy += 1
    else:
        tally.fail(f"HTTP {status} for {'an invalid' if plan.invalid else 'a valid'} request: {text[:200]}")


async def client_loop(url: str, deadline: float, seed: int, corpus: str, args, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
        while time.monotonic() < deadline:
            plan = random_plan(rng, corpus, args)
            try:
                if plan.body.get("stream"):
                    await streamed(client, plan, tally)
                else:
                    await whole(client, plan, tally)
            except httpx.HTTPError as err:
                tally.fail(f"{type(err).__name__}: {err}")


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of Prometheus text format."""
    out = {}
    for match in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+|NaN)$", text, re.MULTILINE):
        out[match.group(1)] = float(match.group(2))
    return out


async def health_loop(url: str, deadline: float, interval_s: float, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=HEALTH_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            try:
                r = await client.get("/health")
                if r.status_code != 200 or r.json().get("status") != "ok":
                    tally.fail(f"/health answered {r.status_code}: {r.text[:200]}")
                metrics = parse_metrics((await client.get("/metrics")).text)
                tally.max_pages_used = max(tally.max_pages_used, metrics.get("vishwam_cache_pages_used", 0.0))
            except httpx.HTTPError as err:
                tally.fail(f"/health failed: {type(err).__name__}: {err}")
            tally.health_checks += 1
            await asyncio.sleep(interval_s)


async def soak(url: str, args) -> Tally:
    tally = Tally()
    corpus = loadgen.read_corpus()
    deadline = time.monotonic() + 60 * args.minutes
    clients = [client_loop(url, deadline, args.seed + i, corpus, args, tally) for i in range(args.clients)]
    await asyncio.gather(health_loop(url, deadline, args.health_interval, tally), *clients)
    return tally


def wait_until_idle(url: str, timeout_s: float) -> dict[str, float]:
    """The gauges once nothing runs or waits (cancelled requests leave at the engine's next step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = parse_metrics(httpx.get(f"{url}/metrics", timeout=HEALTH_TIMEOUT_S).text)
        idle = metrics.get("vishwam_running_requests") == 0 and metrics.get("vishwam_queue_length") == 0
        if (idle and metrics.get("vishwam_cache_pages_used") == 0) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_server(server_args: list[str], log_path: Path, startup_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m vishwam_jax.serve` on a free localhost port (its output in log_path), until it
    answers /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "vishwam_jax.serve", "--port", str(port), *server_args]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before answering")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {startup_s:.0f} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_like_ctrl_c(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGINT, then the exit status (None if it did not exit in time)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def run_soak(url: str, args) -> dict:
    start = time.monotonic()
    tally = asyncio.run(soak(url, args))
    metrics = wait_until_idle(url, args.idle_timeout)
    pages = metrics.get("vishwam_cache_pages_used")
    if pages != 0:
        tally.fail(f"{pages} cache pages still in use once idle")
    if metrics.get("vishwam_running_requests") != 0 or metrics.get("vishwam_queue_length") != 0:
        tally.fail(f"not idle at the end: {metrics}")
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "seconds": time.monotonic() - start,
        **dataclasses.asdict(tally),
        "pages_used_at_end": pages,
        "running_at_end": metrics.get("vishwam_running_requests"),
        "queue_at_end": metrics.get("vishwam_queue_length"),
        "generated_tokens": metrics.get("vishwam_generation_tokens_total"),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--launch", action="store_true", help="start `python -m vishwam_jax.serve` (and stop it)")
    ap.add_argument("--server-args", default="", help="arguments for the launched server, one string")
    ap.add_argument(
        "--server-log",
        default=str(Path(tempfile.gettempdir()) / "vishwam_soak_server.log"),
        help="where the launched server's output goes (default: %(default)s)",
    )
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--max-prompt-chars", type=int, default=400)
    ap.add_argument("--max-output", type=int, default=128, help="max_tokens is drawn from [1, this]")
    ap.add_argument("--disconnect-share", type=float, default=0.2, help="share of requests abandoned part-way")
    ap.add_argument("--invalid-share", type=float, default=0.05, help="share of invalid requests (400 expected)")
    ap.add_argument("--health-interval", type=float, default=1.0, help="seconds between /health polls")
    ap.add_argument("--idle-timeout", type=float, default=120.0, help="seconds the server may take to go idle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the summary here")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.url:
        result = run_soak(args.url, args)
    else:
        with launched_server(args.server_args.split(), Path(args.server_log), startup_s=600) as (url, proc):
            result = run_soak(url, args)
            status = stop_like_ctrl_c(proc, timeout_s=60)
            result["server_exit_status"] = status
            if status != 0:
                result["failures"].append(f"the server did not shut down cleanly (exit status {status})")
    result["ok"] = not result["failures"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
