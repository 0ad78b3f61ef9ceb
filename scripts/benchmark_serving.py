"""Serving throughput and latency under N concurrent streaming clients, against the fixed-batch
`Model.generate` at batch N on the same prompt and output lengths, in one process (issue 18's GPU rows).

    python scripts/benchmark_serving.py --model gemma-2b --clients 64 --prompt-len 512 --output-len 256
    python scripts/benchmark_serving.py --model deepseek-v3-671b --set num_layers=4 num_dense_layers=1 \
        --clients 64 --prompt-len 512 --output-len 256

The model is loaded once (random weights of a preset, or a converted directory). The real server
(`openai_server.create_app` under uvicorn, on an ephemeral localhost port; in a process of its own as
`serve` runs it, or with `--http thread` on a thread of this one) runs an engine with one slot per
client and pages for prompt + output. Clients are
`scripts/loadgen.py` processes (separate processes so that their parsing never competes with the
server for this one's interpreter lock): every request is a prompt of `--prompt-len` random token ids
and generates exactly `--output-len` tokens (`ignore_eos`), streamed. Every compiled shape is built and
the HTTP path is exercised before the timed run; a compilation during it is reported.

Printed and written (--json): output tok/s, TTFT and inter-token latency p50/p90/p99 (seen by the
clients, and at the engine thread), the fixed-batch decode tok/s and step time, and issue 18's ratios:
serving output tok/s / the fixed-batch generate's output tok/s, its prefill and decode (target >= 0.8;
the ratio to its decode loop alone beside it), and p99 inter-token latency / fixed-batch step time
(target <= 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loadgen, beside this file
# The weights take most of the card (DeepSeek-V3 at 4 full-width layers: 48.6 B parameters): JAX's
# default pool of 75 % of the GPU's memory leaves too little for a 64-row prefill.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import loadgen
import numpy as np
from flax import nnx

import vishwam_jax as vj
from vishwam_jax.inference.engine_link import HttpSettings, serve_in_process
from vishwam_jax.inference.engine_thread import EngineThread
from vishwam_jax.inference.openai_server import create_app, serve_in_thread
from vishwam_jax.inference.serving import Engine, EngineConfig, Request
from vishwam_jax.inference.serving_metrics import ServingMetrics

LOADGEN = Path(__file__).resolve().with_name("loadgen.py")
TARGET_THROUGHPUT_RATIO = 0.8  # serving output tok/s over the fixed-batch generate's (prefill + decode), at least
TARGET_ITL_RATIO = 2.0  # p99 inter-token latency over the fixed-batch step time, at most


class _Recorded:
    """A Prometheus histogram that also keeps every observation (exact percentiles)."""

    def __init__(self, histogram, samples: list[float]):
        self._histogram, self._samples = histogram, samples

    def observe(self, value: float) -> None:
        self._samples.append(value)
        self._histogram.observe(value)


class RecordingMetrics(ServingMetrics):
    """The server's metrics, keeping the engine thread's inter-token gaps and TTFTs."""

    def __init__(self):
        super().__init__()
        self.inter_token_s: list[float] = []
        self.ttft_s: list[float] = []
        self.inter_token = _Recorded(self.inter_token, self.inter_token_s)
        self.ttft = _Recorded(self.ttft, self.ttft_s)

    def clear(self) -> None:
        self.inter_token_s.clear()
        self.ttft_s.clear()


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each named thread of this process (Linux; {} elsewhere): the host
    work behind each step, split between the engine thread and the HTTP server's."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[thread.name] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds used so far by process `pid` (Linux; 0 elsewhere): the HTTP server's, when it has
    a process of its own."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serve(engine: Engine, metrics: ServingMetrics, args) -> Iterator[tuple[str, Callable[[], dict[str, float]]]]:
    """The server, as `--http` says; yields its URL and a reader of the host CPU seconds so far of
    the engine thread, the pipe to the HTTP process (if any) and the HTTP server."""
    if args.http == "thread":
        app = create_app(EngineThread(engine, metrics), tokenizer=None, model_name=args.model, drain_timeout_s=5.0)
        with serve_in_thread(app) as (url, _):
            yield url, lambda: {k: v for k, v in thread_cpu_s().items() if k in ("vishwam-engine", "uvicorn")}
        return
    settings = HttpSettings(
        host="127.0.0.1",
        port=0,
        model_name=args.model,
        limits=engine.limits,
        tokenizer=None,
        chat_template_dir=None,
        default_max_tokens=args.output_len,
        drain_timeout_s=5.0,
        log_level="warning",
    )
    with serve_in_process(engine, settings, metrics) as http:

        def cpu() -> dict[str, float]:
            threads = thread_cpu_s()
            link = sum(v for k, v in threads.items() if k.startswith("engine-link"))
            return {
                "vishwam-engine": threads.get("vishwam-engine", 0.0),
                "engine-link": link,
                "http-process": process_cpu_s(http.process.pid),
            }

        yield http.url, cpu


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def prefill_buckets(text: str | None, rows: int) -> tuple[int, ...] | None:
    """--prefill-buckets: "pow2" (1, 2, 4, ... and rows), row counts "1,4,16" (rows is added), or none."""
    if text is None:
        return None
    if text == "pow2":
        return tuple(sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows}))
    return tuple(sorted({int(r) for r in text.split(",")} | {rows}))


def load_model(args) -> vj.Model:
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    unstack = {"auto": None, "scanned": False, "per-layer": True}[args.layers]
    if args.quantize != "none" and args.model in vj.list_models():
        # Random weights drawn in their stored format, leaf by leaf: quantizing at load would first
        # build the float model (73.9 GB for DeepSeek-V3 at 4 full-width layers).
        from benchmark_deepseek import random_params

        config = vj.get_config(args.model, **overrides, quantization=args.quantize)
        per_layer = jax.default_backend() == "gpu" if unstack is None else unstack
        graphdef, params = random_params(config, jnp.dtype(args.dtype), per_layer=per_layer)
        return vj.Model(nnx.merge(graphdef, params))
    source = vj.get_config(args.model, **overrides) if overrides else args.model
    quantize = None if args.quantize == "none" else args.quantize
    return vj.load(source, dtype=jnp.dtype(args.dtype), unstack_layers=unstack, quantize=quantize)


def engine_config(args) -> EngineConfig:
    """One slot per client, and a prompt piece that takes a whole prompt in one chunk."""
    slots = next_power_of_two(args.clients)
    chunk = args.chunk or -(-args.prompt_len // 16) * 16
    rows = min(slots, args.prefill_rows or max(1, args.clients // 4))
    return EngineConfig(
        num_slots=slots,
        max_len=args.prompt_len + args.output_len,
        prefill_rows=rows,
        chunk_buckets=(chunk,),
        prefill_buckets=prefill_buckets(args.prefill_buckets, rows),
        max_queue=max(1024, args.clients),
        lookahead=args.lookahead,
        decode_steps=args.decode_steps,
        speculative=args.speculative,
        paged={"auto": None, "pages": True, "rows": False}[args.cache],
    )


def client_commands(
    args, url: str, vocab_size: int, out_dir: Path, output_len: int, rounds: int = 1
) -> list[list[str]]:
    """One loadgen command per client process, the clients split evenly between them; each client
    sends `rounds` requests, one after the other."""
    procs = min(args.client_procs or max(1, -(-args.clients // 16)), args.clients)
    counts = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
    commands = []
    for i, n in enumerate(counts):
        commands.append(
            [
                sys.executable,
                str(LOADGEN),
                "--url", url,
                "--clients", str(n),
                "--requests", str(n * rounds),
                "--prompt-tokens", f"{args.prompt_len}:{args.prompt_len}",
                "--vocab-size", str(vocab_size),
                "--max-tokens", f"{output_len}:{output_len}",
                "--ignore-eos",
                "--temperature", "0",
                "--seed", str(args.seed + 1000 * i),
                "--json", str(out_dir / f"clients{i}.json"),
                "--wait-for-go",
            ]
        )  # fmt: skip
    return commands


def run_clients(commands: list[list[str]], out_dir: Path, timeout_s: float) -> list[dict]:
    """Start every client process, release them together once all are ready, and gather their results."""
    procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in commands]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"a client process did not start (said {line!r})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            p.communicate(timeout=timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"a client process failed (exit {p.returncode})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for i in range(len(commands)):
        results += json.loads((out_dir / f"clients{i}.json").read_text())["results"]
    return results


def measure_serving(model: vj.Model, args) -> dict:
    """Warm the engine and the HTTP path, then time N concurrent clients, each sending --rounds
    requests in turn (with more than one, new prompts are prefilled beside running streams: the
    steady state of continuous batching)."""
    config = engine_config(args)
    engine = Engine(model, config, tokenizer=None)
    start = time.perf_counter()
    engine.warmup()
    print(f"engine: {config}; compiled {engine.compiles} in {time.perf_counter() - start:.1f} s", flush=True)
    metrics = RecordingMetrics()
    vocab = int(model.config.vocab_size)
    with serve(engine, metrics, args) as (url, host_cpu_s), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # A short untimed round through every layer of the stack (HTTP, client processes, engine).
        run_clients(client_commands(args, url, vocab, out, output_len=2), out, args.timeout)
        compiled = list(engine.compiles)
        metrics.clear()
        commands = client_commands(args, url, vocab, out, args.output_len, args.rounds)
        cpu_before, steps_before = host_cpu_s(), engine.steps
        results = run_clients(commands, out, args.timeout)
        cpu_after, steps = host_cpu_s(), engine.steps - steps_before
    alone = measure_engine_alone(engine, args)
    cpu_ms_per_step = {
        name: 1e3 * (cpu_after[name] - cpu_before[name]) / max(steps, 1) for name in cpu_before if name in cpu_after
    }
    summary = loadgen.summarize(results)
    gaps_ms = 1e3 * np.array([b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])])
    expected = args.clients * args.rounds * args.output_len
    if summary["output_tokens"] != expected:
        raise RuntimeError(f"the clients received {summary['output_tokens']} tokens, expected {expected}")
    return {
        **summary,
        "server_itl_ms": loadgen.percentiles_ms(metrics.inter_token_s),
        "server_ttft_ms": loadgen.percentiles_ms(metrics.ttft_s),
        "engine": {
            "num_slots": config.num_slots,
            "max_len": config.max_len,
            "prefill_rows": config.prefill_rows,
            "prefill_buckets": list(engine.prefill_buckets),
            "chunk_buckets": list(config.chunk_buckets),
            "num_pages": engine.pages.num_blocks,
            "compile_s": engine.compile_s,
            "speculative": config.speculative,
            "paged": engine.paged,
            "accepted_draft_tokens": engine.drafts_accepted,
            "steps": engine.steps,
        },
        # CPU time per engine step of the timed run: the engine thread's, and the HTTP server's (a
        # thread sharing the engine's interpreter lock, or a process of its own beside the pipe's
        # two threads here)
        "http": args.http,
        "host_cpu_ms_per_step": cpu_ms_per_step,
        "engine_alone": alone,
        "compiled_during_run": [list(c) for c in engine.compiles[len(compiled) :]],
        "itl_gaps_ms": gaps_ms,  # every client gap (dropped from the JSON)
    }


def measure_engine_alone(engine: Engine, args) -> dict:
    """The same requests through the same (warm) engine driven directly, with no server, HTTP or
    clients in the process: the throughput the server would reach if its host work were free."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(loadgen.FIRST_ORDINARY_ID, engine.model_config.vocab_size, (args.clients, args.prompt_len))
    requests = [
        Request(f"alone-{i}", tuple(int(t) for t in p), args.output_len, ignore_eos=True) for i, p in enumerate(prompts)
    ]
    steps_before, start = engine.steps, time.perf_counter()
    out = engine.run(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(v) for v in out.values())
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tok_s": tokens / seconds,
        "steps": engine.steps - steps_before,
    }


def measure_fixed_batch(model: vj.Model, args) -> dict:
    """`Model.generate` at batch = clients on the same lengths (as scripts/benchmark_generate.py)."""
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(loadgen.FIRST_ORDINARY_ID, model.config.vocab_size, size=(args.clients, args.prompt_len))
    model.generate(prompts, args.output_len)  # compile + warm
    model.generate(prompts, args.output_len)
    s = model.last_generation_stats
    steps = s.decode_tokens / args.clients
    return {
        "batch": args.clients,
        "decode_tokens": s.decode_tokens,
        "decode_tok_s": s.decode_tokens_per_s,
        "step_ms": 1e3 * s.decode_s / steps,
        "prefill_tok_s": s.prefill_tokens_per_s,
        # prefill + decode of the whole batch: what a client of a fixed batch waits for
        "end_to_end_output_tok_s": s.decode_tokens / (s.prefill_s + s.decode_s),
    }


def ratios(serving: dict, fixed: dict) -> dict:
    """Issue 18's ratios. The throughput target compares with a whole `generate` call at the same
    batch (its prefill and its decode: the output tokens a fixed batch delivers per second); the
    ratio to its decode loop alone, which leaves the prompts' prefill out, is printed beside it."""
    return {
        "throughput": serving["output_tok_s"] / fixed["end_to_end_output_tok_s"],
        "throughput_vs_decode": serving["output_tok_s"] / fixed["decode_tok_s"],
        "p99_itl_over_step": serving["itl_ms"]["p99"] / fixed["step_ms"],
        "engine_alone_throughput": serving["engine_alone"]["output_tok_s"] / fixed["end_to_end_output_tok_s"],
        "server_p99_itl_over_step": serving["server_itl_ms"]["p99"] / fixed["step_ms"],
        "itl_share_over_target": serving["itl_share_over"],
    }


def print_results(serving: dict, fixed: dict, r: dict, clients: int) -> None:
    loadgen.report(f"serving ({clients} streaming clients, {serving['requests']} requests)", serving)
    print(f"  inter-token at the engine thread   {loadgen.format_percentiles(serving['server_itl_ms'])}")
    cpu = serving["host_cpu_ms_per_step"]
    if cpu:
        print("  host CPU per engine step           " + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu.items()))
    if serving["compiled_during_run"]:
        print(f"  WARNING: compiled during the timed run: {serving['compiled_during_run']}")
    print(
        f"fixed-batch generate, batch {fixed['batch']}: decode {fixed['decode_tok_s']:,.1f} tok/s, "
        f"step {fixed['step_ms']:.2f} ms, prefill {fixed['prefill_tok_s']:,.0f} tok/s, "
        f"prefill + decode {fixed['end_to_end_output_tok_s']:,.1f} output tok/s"
    )
    alone = serving["engine_alone"]
    print(
        f"engine alone (same requests, no server): {alone['output_tok_s']:,.1f} tok/s, "
        f"{r['engine_alone_throughput']:.3f} of the fixed-batch generate"
    )
    ok = "meets" if r["throughput"] >= TARGET_THROUGHPUT_RATIO else "misses"
    print(
        f"serving / fixed-batch generate (prefill + decode) tok/s = {r['throughput']:.3f} "
        f"({ok} >= {TARGET_THROUGHPUT_RATIO}); over its decode loop alone = {r['throughput_vs_decode']:.3f}"
    )
    ok = "meets" if r["p99_itl_over_step"] <= TARGET_ITL_RATIO else "misses"
    print(
        f"p99 inter-token latency / fixed-batch step = {r['p99_itl_over_step']:.2f} ({ok} <= {TARGET_ITL_RATIO}); "
        f"at the engine thread {r['server_p99_itl_over_step']:.2f}; "
        f"{100 * r['itl_share_over_target']:.2f} % of the gaps over {TARGET_ITL_RATIO} steps"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-2b", help="preset name or converted model directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides of the preset (JSON values)"
    )
    ap.add_argument(
        "--quantize",
        choices=["none", "fp8", "int8"],
        default="none",
        help="weights in this format (a preset's random weights are drawn in it directly)",
    )
    ap.add_argument(
        "--layers",
        choices=["auto", "scanned", "per-layer"],
        default="auto",
        help="stacked weights scanned, or held as per-layer buffers (auto: per-layer on GPUs)",
    )
    ap.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (= the fixed batch)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--prefill-rows", type=int, default=None, help="requests prefilled per step (default: clients/4)")
    ap.add_argument(
        "--prefill-buckets",
        default=None,
        help="prefill row counts to choose from as requests wait, e.g. 4,16 or pow2 (1, 2, 4, ...), "
        "beside --prefill-rows (default: --prefill-rows only; with buckets, not batch-invariant)",
    )
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk length (default: the prompt, rounded to 16)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="requests each client sends, one after the other (default: 1)"
    )
    ap.add_argument(
        "--lookahead", type=int, default=EngineConfig.lookahead, help="steps dispatched before one is read (0: none)"
    )
    ap.add_argument("--decode-steps", type=int, default=1, help="decode steps per dispatch (tokens per round trip)")
    ap.add_argument(
        "--speculative", action="store_true", help="DeepSeek-V3: MTP drafts verified in each decode step (greedy)"
    )
    ap.add_argument(
        "--cache",
        choices=["auto", "pages", "rows"],
        default="auto",
        help="page pools (auto: where the family pages) or one contiguous row per slot",
    )
    ap.add_argument(
        "--http",
        choices=["process", "thread"],
        default="process",
        help="the HTTP server in a process of its own (as `serve` runs it) or on a thread of the engine's",
    )
    ap.add_argument("--client-procs", type=int, default=None, help="client processes (default: one per 16 clients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a round of clients may take")
    ap.add_argument("--json", help="also write the results here")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    model = load_model(args)
    print(f"{model}, {args.dtype}; {args.clients} clients, prompt {args.prompt_len}, output {args.output_len}")
    serving = measure_serving(model, args)
    fixed = measure_fixed_batch(model, args)
    gaps_ms = serving.pop("itl_gaps_ms")
    serving["itl_share_over"] = float(np.mean(gaps_ms > TARGET_ITL_RATIO * fixed["step_ms"]))
    r = ratios(serving, fixed)
    print_results(serving, fixed, r, args.clients)
    if args.json:
        result = {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "model": args.model,
            "overrides": args.set,
            "dtype": args.dtype,
            "quantize": args.quantize,
            "weight_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)}),
            "clients": args.clients,
            "rounds": args.rounds,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "serving": serving,
            "fixed_batch": fixed,
            "ratios": r,
            "targets": {"throughput": TARGET_THROUGHPUT_RATIO, "p99_itl_over_step": TARGET_ITL_RATIO},
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
