"""The trace summariser: kernels summed per device from stream lines only, never twice."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from vishwam_jax.utils import profiling


def _trace(path):
    meta = lambda ph_name, pid, name, tid=None: {
        "ph": "M",
        "name": ph_name,
        "pid": pid,
        "tid": tid,  # noqa: E731
        "args": {"name": name},
    }
    x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur}  # noqa: E731
    events = [
        meta("process_name", 1, "/host:CPU"),
        meta("process_name", 7, "/device:GPU:1"),
        meta("process_name", 5, "/device:GPU:0"),
        meta("process_name", 9, "/device:GPU:10"),
        meta("thread_name", 5, "Stream #13(Compute)", 13),
        meta("thread_name", 5, "Stream #14(NCCL)", 14),
        meta("thread_name", 5, "XLA Ops", 2),
        meta("thread_name", 7, "Stream #13(Compute)", 13),
        x(5, 13, "vishwam_gmm", 300.0),
        x(5, 13, "vishwam_gmm", 100.0),
        x(5, 14, "ncclAllToAll", 50.0),
        x(5, 13, "loop_fusion", 50.0),
        x(5, 2, "custom-call.3", 400.0),  # the op line repeats the gmm time: not counted
        x(7, 13, "vishwam_gmm", 999.0),  # other device
        x(1, 3, "PjitFunction(step)", 5000.0),  # host
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summarize_trace_counts_stream_kernels_of_one_device(tmp_path):
    path = str(tmp_path / "perfetto_trace.json.gz")
    _trace(path)
    s = profiling.summarize_trace(path, calls=2)
    assert s["device"] == "/device:GPU:0"
    assert s["busy_us_per_call"] == pytest.approx(250.0)
    assert [(o["name"], o["us_per_call"], o["count_per_call"]) for o in s["ops"]] == [
        ("vishwam_gmm", 200.0, 1.0),
        ("ncclAllToAll", 25.0, 0.5),
        ("loop_fusion", 25.0, 0.5),
    ]
    assert s["ops"][0]["share"] == pytest.approx(0.8)
    assert profiling.summarize_trace(path, device=1)["busy_us_per_call"] == pytest.approx(999.0)
    assert profiling.summarize_trace(path, device=2)["device"] == "/device:GPU:10"  # natural order
    assert profiling.summarize_trace(path, device=3)["ops"] == []
    assert "vishwam_gmm" in profiling.format_summary(s)


def test_profile_device_ops_runs_a_stateful_step(tmp_path):
    """A closure that carries its state (like a donated decode cache) runs 1 + calls times; on CPU the
    trace has no device lines, so the summary is empty but well formed."""
    f = jax.jit(lambda x: x * 2.0, donate_argnums=0)
    state = {"x": jnp.ones(4), "n": 0}

    def step():
        state["x"] = f(state["x"])
        state["n"] += 1
        return state["x"]

    s = profiling.profile_device_ops(step, calls=2, log_dir=str(tmp_path))
    assert state["n"] == 3 and float(state["x"][0]) == 8.0
    assert s["trace"].endswith("perfetto_trace.json.gz")
    if jax.default_backend() == "cpu":
        assert s["ops"] == [] and "no device kernels" in profiling.format_summary(s)
