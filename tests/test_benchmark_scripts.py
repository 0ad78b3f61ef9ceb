"""The benchmark entry points run end to end on CPU (tiny shapes; interpret-mode kernels), so a
device run is never the first time a script's plumbing executes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_kernels_gmm_smoke():
    out = run("scripts/benchmark_kernels.py", "gmm", "--smoke")
    assert "all checks passed" in out and "other tiling" in out


def test_benchmark_gmm_tune_fp8_smoke():
    """The fp8 x fp8 tile sweep the next GPU run needs: every Triton config of both weight layouts and
    one Mosaic GPU config run and agree with the default one (interpret mode, tiny shapes)."""
    out = run("scripts/benchmark_gmm.py", "--smoke", "--tune-fp8", "--skip-full-checks", "--only", "none")
    lines = [line for line in out.splitlines() if line.startswith("tune fp8 ")]
    assert sum("Mosaic" in line for line in lines) == 1
    assert len(lines) == 2 * (1 + 5) + 1 and not any("fails" in line or "MISMATCH" in line for line in lines), out


def test_benchmark_deepseek_smoke(tmp_path):
    out = run(
        "scripts/benchmark_deepseek.py",
        "--preset",
        "deepseek-v3-tiny",
        "--layers",
        "2",
        "--dense-layers",
        "1",
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--impls",
        "auto",
        "--bandwidth-mib",
        "16",
        "--quantize",
        "none",
        "fp8",
        "fp8-activations",
        "--json",
        str(tmp_path / "ds.json"),
    )
    assert "[none auto] batch 2: prefill" in out and "cache arrays measured" in out
    assert "[fp8-activations auto] batch 2: prefill" in out
    assert "[fp8 auto] batch 2: prefill" in out  # the release's weight format, read by the block-scaled kernel
    rows = json.loads((tmp_path / "ds.json").read_text())["rows"]
    assert [r["quantization"] for r in rows] == ["none", "fp8", "fp8-activations"]


def test_benchmark_grok_smoke_per_layer(tmp_path):
    """The per-layer form is what the GPU rows of BENCHMARKS.md measure; its plumbing (unstacking after the
    read-bytes count, which needs the stacked tree) must run before a device call does."""
    out = run(
        "scripts/benchmark_grok.py",
        "--preset",
        "grok-1-tiny",
        "--layers",
        "2",
        "--batch",
        "1",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--weights",
        "bf16",
        "int8",
        "--layers-form",
        "per-layer",
        "--json",
        str(tmp_path / "grok.json"),
    )
    assert "layers: per-layer buffers" in out
    assert "bf16 batch 1: decode" in out and "int8 batch 1: decode" in out
    rows = json.loads((tmp_path / "grok.json").read_text())["rows"]
    assert [r["layers_form"] for r in rows] == ["per-layer", "per-layer"] and all(r["step_bytes"] > 0 for r in rows)


def test_benchmark_generate_peer_is_skipped_by_name_on_a_cpu(tmp_path):
    out = run(
        "scripts/benchmark_generate.py",
        "--model",
        "gemma-tiny",
        "--dtype",
        "float32",
        "--batch",
        "1",
        "--prompt-len",
        "8",
        "--new-tokens",
        "4",
        "--peer",
        "--quantize",
        "none",
        "int8",
        "--json",
        str(tmp_path / "g.json"),
    )
    assert "transformers peer: no CUDA GPU on this machine, skipped" in out
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["transformers"] == [] and result["read_bw"] > 0
    assert [r["weights"] for r in result["rows"]] == ["none", "int8"]
    assert all(0 < r["fraction_of_roofline"] for r in result["rows"])
    # int8 weights read fewer bytes per step than float32 ones (the floor moves with them)
    assert result["rows"][1]["param_gb"] < 0.5 * result["rows"][0]["param_gb"]


def test_peer_transformers_runs_its_modes_on_cpu_when_asked(tmp_path):
    run(
        "scripts/peer_transformers.py",
        "--model",
        "gemma-tiny",
        "--batch",
        "1",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--device",
        "cpu",
        "--modes",
        "eager",
        "static-nocompile",
        "--json",
        str(tmp_path / "p.json"),
    )
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eager", "static-nocompile"]
    # A 3-token decode rate is the difference of two near-equal CPU timings: its sign is noise here.
    assert all(np.isfinite(r["decode_tok_s"]) and r["prefill_tok_s"] > 0 for r in rows)


def test_benchmark_serving_smoke(tmp_path):
    """The serving rows' plumbing: a real server, client processes with token-id prompts and exactly
    output-len tokens each (two requests per client, one after the other), then the fixed batch in
    the same process, and the two ratios."""
    out = run(
        "scripts/benchmark_serving.py",
        "--model",
        "gemma-tiny",
        "--dtype",
        "float32",
        "--clients",
        "4",
        "--prompt-len",
        "12",
        "--output-len",
        "6",
        "--client-procs",
        "2",
        "--rounds",
        "2",
        "--prefill-rows",
        "2",
        "--prefill-buckets",
        "pow2",
        "--json",
        str(tmp_path / "s.json"),
    )
    assert "serving / fixed-batch generate (prefill + decode) tok/s" in out
    result = json.loads((tmp_path / "s.json").read_text())
    serving, fixed = result["serving"], result["fixed_batch"]
    assert serving["requests"] == 4 * 2 and serving["output_tokens"] == 4 * 2 * 6  # 2 rounds of 4 clients
    assert serving["compiled_during_run"] == [] and serving["engine"]["num_slots"] == 4
    for latency in (serving["ttft_ms"], serving["itl_ms"], serving["server_itl_ms"]):
        assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"]
    assert fixed["batch"] == 4 and fixed["decode_tok_s"] > 0 and fixed["step_ms"] > 0
    for name in ("throughput", "throughput_vs_decode", "p99_itl_over_step", "server_p99_itl_over_step"):
        assert 0 < result["ratios"][name] < float("inf"), name
    assert 0 <= result["ratios"]["itl_share_over_target"] <= 1
    assert serving["engine"]["prefill_buckets"] == [1, 2]  # --prefill-rows 2 --prefill-buckets
    assert serving["http"] == "process"  # as `serve` runs it
    assert set(serving["host_cpu_ms_per_step"]) == {"vishwam-engine", "engine-link", "http-process"}
    alone = serving["engine_alone"]
    assert alone["output_tokens"] == 4 * 6 and alone["output_tok_s"] > 0 and alone["steps"] > 0


def test_benchmark_serving_speculative_smoke(tmp_path):
    """DeepSeek-V3 in FP8 behind the server (on a thread of the engine's process: --http thread) with
    MTP drafts verified in the engine: every client gets exactly its output-len tokens (the device's
    own count stops a row at max_tokens)."""
    run(
        "scripts/benchmark_serving.py", "--model", "deepseek-v3-tiny", "--dtype", "float32", "--clients", "2",
        "--prompt-len", "12", "--output-len", "6", "--client-procs", "1", "--speculative", "--quantize", "fp8",
        "--http", "thread",
        "--json", str(tmp_path / "s.json"),
    )  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    engine = result["serving"]["engine"]
    assert engine["speculative"] and engine["accepted_draft_tokens"] >= 0 and engine["steps"] > 0
    assert "float8_e4m3fn" in result["weight_dtypes"]  # drawn in FP8 directly (--quantize)
    assert set(result["serving"]["host_cpu_ms_per_step"]) == {"vishwam-engine", "uvicorn"}


def test_benchmark_training_memory_smoke():
    out = run(
        "scripts/benchmark_training_memory.py", "--model", "gemma-tiny", "--batch-size", "2", "--seq-len", "64",
        "--remat", "none", "--loss-chunk", "0", "16",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if "temporaries" in line]
    temporaries = [float(line.split("temporaries ")[1].split(" GB")[0]) for line in rows]
    assert len(temporaries) == 2 and temporaries[1] < temporaries[0], out


def test_benchmark_fp8_training_smoke():
    out = run(
        "scripts/benchmark_fp8_training.py", "--models", "gemma-tiny", "--steps", "3", "--every", "1",
        "--batch-size", "2", "--seq-len", "16",
    )  # fmt: skip
    assert "final loss fp8 / bf16" in out and out.count("\nbf16 ") == 1 and out.count("\nfp8 ") == 1


def test_benchmark_fp8_training_time_smoke():
    out = run(
        "scripts/benchmark_fp8_training.py", "--time", "deepseek-v3-tiny", "--set", "num_layers=2",
        "num_dense_layers=1", "--batch-size", "2", "--seq-len", "32", "--time-steps", "1", "--remat", "none",
    )  # fmt: skip
    assert "bf16: " in out and "fp8: " in out and "fp8 step speedup over bf16" in out


def test_benchmark_paged_attention_smoke(tmp_path):
    run("scripts/benchmark_paged_attention.py", "--interpret", "--shapes", "tiny", "--json", str(tmp_path / "p.json"))
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert row["ok"] and row["ours"]["us"] > 0 and row["xla_gather"]["us"] > 0


def test_benchmark_sampling_smoke():
    out = run("scripts/benchmark_sampling.py", "--batch", "3", "--vocab", "300", "--calls", "1")
    assert out.count(" ms per call") == 4


def test_benchmark_stop_text_smoke(tmp_path):
    tokenizer = ROOT.parent / "shared" / "data" / "grok1-tokenizer.model"
    if tokenizer.is_file():  # Grok-1's real tokenizer, beside the repository where it is available
        out = run("scripts/benchmark_stop_text.py", "--tokenizer", str(tokenizer), "--tokens", "32")
        assert out.startswith("32 tokens: StopText ")
    bad = tmp_path / "not-a-model"
    bad.write_text("not sentencepiece")
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark_stop_text.py", "--tokenizer", str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
