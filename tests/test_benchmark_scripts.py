"""The benchmark entry points run end to end on CPU (tiny shapes; interpret-mode kernels), so a
device run is never the first time a script's plumbing executes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_kernels_gmm_smoke():
    out = run("scripts/benchmark_kernels.py", "gmm", "--smoke")
    assert "all checks passed" in out and "other tiling" in out


def test_benchmark_deepseek_smoke(tmp_path):
    out = run("scripts/benchmark_deepseek.py", "--preset", "deepseek-v3-tiny", "--layers", "2", "--dense-layers", "1",
              "--batch", "2", "--prompt-len", "8", "--new-tokens", "2", "--impls", "auto", "--bandwidth-mib", "16",
              "--json", str(tmp_path / "ds.json"))
    assert "[auto] batch 2: prefill" in out and "cache arrays measured" in out


def test_benchmark_grok_smoke_per_layer(tmp_path):
    """The per-layer form is what the GPU rows of BENCHMARKS.md measure; its plumbing (unstacking after the
    read-bytes count, which needs the stacked tree) must run before a device call does."""
    out = run("scripts/benchmark_grok.py", "--preset", "grok-1-tiny", "--layers", "2", "--batch", "1",
              "--prompt-len", "8", "--new-tokens", "2", "--weights", "bf16", "int8", "--layers-form", "per-layer",
              "--json", str(tmp_path / "grok.json"))
    assert "layers: per-layer buffers" in out
    assert "bf16 batch 1: decode" in out and "int8 batch 1: decode" in out
    rows = json.loads((tmp_path / "grok.json").read_text())["rows"]
    assert [r["layers_form"] for r in rows] == ["per-layer", "per-layer"] and all(r["step_bytes"] > 0 for r in rows)
