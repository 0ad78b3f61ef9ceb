"""Where a jitted step spends its device time: a JAX profiler trace, summarised per kernel.

    summary = profile_device_ops(lambda: step_fn(*args), calls=3)
    for op in summary["ops"][:10]:
        print(op["name"], op["us_per_call"], op["count_per_call"])

The trace is the profiler's Perfetto export (`jax.profiler.trace(..., create_perfetto_trace=True)`),
plain gzipped JSON, so no TensorBoard or xprof is needed to read it. Device events are the ones of
processes named "/device:..." (one per GPU/TPU); their threads are either hardware streams (one event
per kernel launch) or XLA's op / module lines, which repeat the same time at coarser names. Kernels
are summed from the stream lines only, so overlapping lines are never counted twice. On CPU the
trace has no device processes and the summary is empty.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable

import jax


def _names(events: list[dict], what: str) -> dict:
    return {
        (e.get("pid"), e.get("tid")) if what == "thread_name" else e.get("pid"): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == what
    }


def summarize_trace(path: str, calls: int = 1, device: int = 0) -> dict:
    """Per-kernel device time of one device in a Perfetto trace (.json or .json.gz), divided by `calls`.

    Returns {"device": process name, "busy_us_per_call": summed kernel time, "ops": [{"name",
    "us_per_call", "count_per_call", "share"}] sorted by time, "lines": thread names seen}. Kernels
    running concurrently on several streams add up, so "busy" can exceed the wall time.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = _names(events, "process_name")
    threads = _names(events, "thread_name")

    # Natural order, so "/device:GPU:10" comes after "/device:GPU:2".
    def natural(pid):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", processes[pid])]

    devices = sorted((pid for pid, name in processes.items() if name.startswith("/device:")), key=natural)
    if device >= len(devices):
        return {"device": None, "busy_us_per_call": 0.0, "ops": [], "lines": []}
    pid = devices[device]
    lines = sorted({name for (p, _), name in threads.items() if p == pid})
    # Hardware streams carry one event per kernel; "XLA Ops"/"XLA Modules"/step lines re-cover the
    # same intervals. Without any stream line (some TPU traces), fall back to the op line.
    stream_tids = {t for (p, t), name in threads.items() if p == pid and name.lower().startswith("stream")}
    if not stream_tids:
        stream_tids = {t for (p, t), name in threads.items() if p == pid and name == "XLA Ops"}
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") == pid and e.get("tid") in stream_tids:
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    busy = sum(total.values())
    ops = [
        {
            "name": name,
            "us_per_call": us / calls,
            "count_per_call": count[name] / calls,
            "share": us / busy if busy else 0.0,
        }
        for name, us in total.most_common()
    ]
    return {"device": processes[pid], "busy_us_per_call": busy / calls, "ops": ops, "lines": lines}


def profile_device_ops(
    run_once: Callable[[], object], calls: int = 3, log_dir: str | None = None, device: int = 0
) -> dict:
    """Call `run_once()` (one step; a closure may carry state such as a donated cache from call to
    call) once to compile, then `calls` times under the profiler, waiting for each result; the
    `summarize_trace` of that trace, plus its path."""
    jax.block_until_ready(run_once())
    log_dir = log_dir or tempfile.mkdtemp(prefix="vishwam_profile_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(run_once())
    traces = sorted(
        glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime
    )
    if not traces:
        raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {log_dir}")
    summary = summarize_trace(traces[-1], calls=calls, device=device)
    summary["trace"] = traces[-1]
    return summary


def format_summary(summary: dict, top: int = 15) -> str:
    if not summary["ops"]:
        return f"no device kernels in the trace (device processes: {summary['device']}; lines {summary['lines']})"
    rows = [f"{summary['device']}: {summary['busy_us_per_call']:,.1f} us of kernels per call"]
    for op in summary["ops"][:top]:
        rows.append(
            f"  {op['us_per_call']:>10,.1f} us {op['share']:>6.1%}  x{op['count_per_call']:<5g} {op['name'][:110]}"
        )
    return "\n".join(rows)
