"""Load generator for `python -m vishwam_jax.serve`: N concurrent streaming clients.

    python scripts/loadgen.py --url http://127.0.0.1:8000 --clients 24 --requests 24 \
        --prompt-chars 20:200 --max-tokens 16:64 --temperature 0 --seed 0 --compare-sequential

Prompt and output lengths are drawn uniformly from the given ranges (seeded); prompts are slices of
the Shakespeare corpus shipped with the package, or with --prompt-tokens LO:HI lists of token ids
drawn from [3, --vocab-size) (models without a tokenizer, e.g. the random-weight presets).
--ignore-eos makes every request generate exactly its max_tokens. Reports throughput, time to first
token and inter-token latency percentiles (p50/p90/p99); --json writes them. --compare-sequential
then sends the same requests one at a time, reports the speed-up of the concurrent run and checks
that every answer is identical.

The functions are importable (scripts/benchmark_serving.py and scripts/soak_serving.py use them).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

CORPUS = Path(__file__).resolve().parents[1] / "vishwam_jax" / "data" / "shakespeare.txt.gz"
FIRST_ORDINARY_ID = 3  # ids below are pad / eos / bos in every preset's vocabulary


def parse_range(text: str) -> tuple[int, int]:
    """ "LO:HI" (or "N") as an inclusive range."""
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def read_corpus() -> str:
    with gzip.open(CORPUS, "rt") as f:
        return f.read()


def text_requests(count: int, prompt_chars: tuple[int, int], max_tokens: tuple[int, int], seed: int) -> list[dict]:
    """Request bodies whose prompts are corpus slices of a length drawn from prompt_chars."""
    corpus = read_corpus()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(prompt_chars[0], prompt_chars[1] + 1))
        start = int(rng.integers(0, len(corpus) - n))
        limit = int(rng.integers(max_tokens[0], max_tokens[1] + 1))
        out.append({"prompt": corpus[start : start + n], "max_tokens": limit})
    return out


def token_requests(
    count: int, prompt_tokens: tuple[int, int], max_tokens: tuple[int, int], vocab_size: int, seed: int
) -> list[dict]:
    """Request bodies whose prompts are token ids drawn uniformly from the ordinary vocabulary."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(prompt_tokens[0], prompt_tokens[1] + 1))
        ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, n)
        limit = int(rng.integers(max_tokens[0], max_tokens[1] + 1))
        out.append({"prompt": [int(t) for t in ids], "max_tokens": limit})
    return out


def chunk_tokens(choice: dict) -> int:
    """Tokens a streamed choice carries: its token ids where the server sends them (models without
    a tokenizer, or return_token_ids), else one per non-empty text chunk."""
    if "token_ids" in choice:
        return len(choice["token_ids"] or ())
    return 1 if choice.get("text") else 0


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """Stream one completion; the arrival time (seconds after sending) of every chunk that carries
    output, and `start`, the send time on the monotonic clock (shared by every process of a host)."""
    start = time.monotonic()
    arrivals, text, ids, tokens = [], [], [], 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0]
            n = chunk_tokens(choice)
            if n:
                arrivals.append(time.monotonic() - start)
                text.append(choice.get("text") or "")
                ids.extend(choice.get("token_ids") or ())
                tokens += n
    return {"text": "".join(text), "token_ids": ids, "tokens": tokens, "arrivals": arrivals, "start": start}


async def run_load(url: str, requests: list[dict], clients: int) -> tuple[list[dict], float]:
    """Send `requests` with at most `clients` in flight; (results in request order, wall seconds)."""
    limit = asyncio.Semaphore(clients)

    async def limited(client, body):
        async with limit:
            return await one_request(client, body)

    connections = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=connections) as client:
        start = time.monotonic()
        results = await asyncio.gather(*(limited(client, body) for body in requests))
        return results, time.monotonic() - start


def percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ms = np.asarray(values) * 1000
    p50, p90, p99, p999 = np.percentile(ms, [50, 90, 99, 99.9])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "p99.9": float(p999), "max": float(ms.max())}


def summarize(results: list[dict]) -> dict:
    """Throughput and latency percentiles of results from one or more processes: the wall time runs
    from the first send to the last chunk (monotonic clock)."""
    first = min(r["start"] for r in results)
    last = max(r["start"] + (r["arrivals"][-1] if r["arrivals"] else 0.0) for r in results)
    wall = last - first
    tokens = sum(r["tokens"] for r in results)
    # Gaps between output chunks: a chunk carries one token (text is held back only near stop
    # strings and inside multi-byte characters), so these are the inter-token latencies.
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": percentiles_ms([r["arrivals"][0] for r in results if r["arrivals"]]),
        "itl_ms": percentiles_ms(itl),
    }


def format_percentiles(p: dict[str, float] | None) -> str:
    if p is None:
        return "n/a"
    line = f"p50 {p['p50']:8.1f} ms   p90 {p['p90']:8.1f} ms   p99 {p['p99']:8.1f} ms"
    return line + (f"   max {p['max']:8.1f} ms" if "max" in p else "")


def report(label: str, summary: dict) -> None:
    print(
        f"{label}: {summary['requests']} requests, {summary['output_tokens']} output tokens in "
        f"{summary['wall_s']:.2f} s = {summary['output_tok_s']:.1f} tok/s"
    )
    print(f"  time to first token   {format_percentiles(summary['ttft_ms'])}")
    print(f"  inter-token latency   {format_percentiles(summary['itl_ms'])}")


def answer(result: dict) -> tuple:
    return result["text"], result["token_ids"]


def build_requests(args) -> list[dict]:
    if args.prompt_tokens is not None:
        requests = token_requests(args.requests, args.prompt_tokens, args.max_tokens, args.vocab_size, args.seed)
    else:
        requests = text_requests(args.requests, args.prompt_chars, args.max_tokens, args.seed)
    for i, body in enumerate(requests):
        body.update(temperature=args.temperature, seed=args.seed + i)
        if args.ignore_eos:
            body["ignore_eos"] = True
    return requests


def wait_for_go() -> None:
    """Tell a parent process this one is ready (a line "ready"), then wait for its line "go": several
    client processes then start their load together."""
    print("ready", flush=True)
    sys.stdin.readline()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=24, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=24, help="requests in all")
    ap.add_argument(
        "--prompt-chars", type=parse_range, default=(20, 200), help="prompt length range LO:HI (characters)"
    )
    ap.add_argument(
        "--prompt-tokens", type=parse_range, default=None, help="prompts of token ids instead, length range LO:HI"
    )
    ap.add_argument("--vocab-size", type=int, default=256, help="token ids are drawn below this (--prompt-tokens)")
    ap.add_argument("--max-tokens", type=parse_range, default=(16, 64), help="output length range LO:HI (tokens)")
    ap.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens (no stop at EOS)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-sequential", action="store_true", help="also send them one at a time and compare")
    ap.add_argument("--json", help="write the summary (and each request's chunk arrival times) here")
    ap.add_argument("--wait-for-go", action="store_true", help=argparse.SUPPRESS)  # see wait_for_go()
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    requests = build_requests(args)
    if args.wait_for_go:
        wait_for_go()
    results, _ = asyncio.run(run_load(args.url, requests, args.clients))
    summary = summarize(results)
    report(f"concurrent ({args.clients} clients)", summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": results}))
    if args.compare_sequential:
        sequential, _ = asyncio.run(run_load(args.url, requests, 1))
        alone = summarize(sequential)
        report("sequential (1 client)", alone)
        same = sum(answer(a) == answer(b) for a, b in zip(results, sequential))
        print(f"speed-up {alone['wall_s'] / summary['wall_s']:.2f}x; identical answers: {same} of {len(results)}")
        if same != len(results):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
