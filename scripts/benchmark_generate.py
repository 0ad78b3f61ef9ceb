"""Decode (and prefill) tokens/s of a preset with random weights against the read-bandwidth floor,
and beside transformers on the same GPU in the same run.

    python scripts/benchmark_generate.py --model gemma-2b --dtype bfloat16 --batch 1 8 --peer

The floor of one decode step is (parameter bytes + KV-cache bytes read) / read bandwidth, the read
bandwidth measured in the same run (`utils.benchmarking.read_bandwidth`; the datasheet figure is shown
beside it, never divided by). --peer first runs `scripts/peer_transformers.py` (static cache + compile,
and eager) in a subprocess, before JAX takes the GPU's memory, and prints our rate over each of its rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import vishwam_jax as vj
from vishwam_jax.utils.benchmarking import read_bandwidth, tree_bytes
from vishwam_jax.utils.profiling import format_summary, profile_device_ops


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-2b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="config overrides of the preset, e.g. scan_unroll=18 (JSON values)",
    )
    ap.add_argument(
        "--layers",
        choices=["auto", "scanned", "per-layer"],
        default="auto",
        help="stacked weights scanned, or held as per-layer buffers (auto: per-layer on GPUs)",
    )
    ap.add_argument("--peer", action="store_true", help="also run transformers on the same shapes (GPU only)")
    ap.add_argument(
        "--peer-modes",
        nargs="+",
        default=["static", "eager"],
        choices=["static", "static-nocompile", "eager"],
        help="transformers rows (static: static cache + compile; eager: dynamic cache, its default attention, SDPA)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one generate call per batch: device time and kernel launches per decode step",
    )
    ap.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=["none", "int8", "fp8"],
        help="weight formats to time in turn (quantized at load, weight-only; issue 14's int8 row: int8 vs none)",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    peer_run = run_peer(args) if args.peer else {}  # before JAX initialises the GPU and reserves its memory
    peer = peer_run.get("rows", [])
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    bw = read_bandwidth()
    print(f"measured {bw.describe()}", flush=True)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    source = vj.get_config(args.model, **overrides) if overrides else args.model
    unstack = {"auto": None, "scanned": False, "per-layer": True}[args.layers]
    rows = []
    for weights in args.quantize:
        quantize = None if weights == "none" else weights
        model = vj.load(source, dtype=jnp.dtype(args.dtype), unstack_layers=unstack, quantize=quantize)
        rows += time_model(model, weights, args, bw, peer)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "read_bw": bw.bytes_per_s,
                    "read_bw_xla": bw.xla_reduction,
                    "read_bw_pallas": bw.pallas_stream,
                    "spec_bw": bw.spec,
                    "rows": rows,
                    "transformers": peer,
                    "torch_read_bw": peer_run.get("torch_read_bw"),
                },
                f,
                indent=2,
            )


def time_model(model, weights: str, args, bw, peer: list) -> list[dict]:
    """Decode and prefill rows of one loaded model, one per batch size."""
    param_bytes = tree_bytes(model.params)
    c = model.config
    rows = []
    for batch in args.batch:
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, c.vocab_size, size=(batch, args.prompt_len))
        # Stop tokens are never sampled greedily from these weights in practice; counted tokens say.
        model.generate(prompts, args.new_tokens)  # compile + warm
        model.generate(prompts, args.new_tokens)
        s = model.last_generation_stats
        steps = s.decode_tokens / batch
        step_s = s.decode_s / steps
        # KV bytes read per step at the mean cache length of the run (full-attention layers).
        cache = model.module.init_cache(batch, args.prompt_len + args.new_tokens, jnp.dtype(args.dtype))
        kv_bytes = tree_bytes(cache) * (args.prompt_len + args.new_tokens / 2) / (args.prompt_len + args.new_tokens)
        floor_s = (param_bytes + kv_bytes) / bw.bytes_per_s
        row = {
            "model": args.model,
            "weights": weights,
            "layers": args.layers,
            "batch": batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_tok_s": s.prefill_tokens_per_s,
            "decode_tok_s": s.decode_tokens_per_s,
            "decode_tok_s_per_stream": 1 / step_s,
            "step_ms": step_s * 1e3,
            "roofline_step_ms": floor_s * 1e3,
            "fraction_of_roofline": floor_s / step_s,
            "param_gb": param_bytes / 1e9,
            "fraction_of_spec": (param_bytes + kv_bytes) / bw.spec / step_s if bw.spec else None,
        }
        for p in peer:
            if p["batch"] == batch:
                row[f"vs_transformers_{p['mode']}"] = row["decode_tok_s"] / p["decode_tok_s"]
                row[f"prefill_vs_transformers_{p['mode']}"] = row["prefill_tok_s"] / p["prefill_tok_s"]
        if args.profile:
            row["profile"] = profile_steps(lambda: model.generate(prompts, args.new_tokens), args.new_tokens, step_s)
        rows.append(row)
        spec = f", {100 * row['fraction_of_spec']:.0f}% of spec" if row["fraction_of_spec"] else ""
        versus = "".join(
            f", {row['decode_tok_s'] / p['decode_tok_s']:.2f}x transformers {p['mode']} "
            f"(prefill {row['prefill_tok_s'] / p['prefill_tok_s']:.2f}x)"
            for p in peer
            if p["batch"] == batch
        )
        print(
            f"{args.model} {args.dtype} {weights} weights, batch {batch}: prefill {row['prefill_tok_s']:,.0f} tok/s, "
            f"decode {row['decode_tok_s']:,.1f} tok/s ({row['decode_tok_s_per_stream']:.1f}/stream), "
            f"step {row['step_ms']:.2f} ms vs floor {row['roofline_step_ms']:.2f} ms "
            f"({100 * row['fraction_of_roofline']:.0f}% of read bandwidth{spec}){versus}",
            flush=True,
        )
    return rows


def profile_steps(generate_once, steps: int, step_s: float) -> dict:
    """Kernel time and launches per decode step of one generate call (its prefill is included and
    spread over the steps, a few percent at 256 steps). Device time well below the step time means
    the GPU waits between kernels: launch-bound, or a host round trip per step."""
    summary = profile_device_ops(generate_once, calls=1)
    busy_us = summary["busy_us_per_call"] / steps
    launches = sum(op["count_per_call"] for op in summary["ops"]) / steps
    print(
        f"  profile: {busy_us:,.1f} us of kernels and {launches:,.1f} launches per step "
        f"in a {step_s * 1e6:,.1f} us step ({100 * busy_us / (step_s * 1e6):.0f}% busy)"
    )
    print(format_summary(summary, top=20))
    return {
        "busy_us_per_step": busy_us,
        "launches_per_step": launches,
        "busy_fraction": busy_us / (step_s * 1e6),
        "top_ops": summary["ops"][:20],
    }


def run_peer(args) -> dict:
    """transformers on the same preset and shapes, in a subprocess (its GPU memory is freed when it exits)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("peer_transformers.py")),
            "--model",
            args.model,
            "--batch",
            *map(str, args.batch),
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            "--modes",
            *args.peer_modes,
            "--json",
            str(out),
        ]
        proc = subprocess.run(cmd, text=True)
        if proc.returncode != 0 or not out.exists():
            print(f"transformers peer failed (exit {proc.returncode}); our rows follow without it", flush=True)
            return {}
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
