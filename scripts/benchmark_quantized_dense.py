"""Dense projections with int8 and fp8 weights, as the models run them (`models.layers.linear`),
beside the bf16 matmul XLA runs, on the shapes of gemma-2b, gemma3-27b and DeepSeek-V3.

Each quantized format is timed in both layouts: [K, N], and K-major [N, K], the layout a quantized
matrix with one input and one output dimension is stored in (`layers.Linear`). `linear` runs fp8 on
the grouped-matmul kernel (one group) and int8 on XLA's fused int8 dot, in either layout; at up to
VARIANT_ROWS rows the kernel is also timed on the K-major int8 and fp8 weights, with its default
block config and a narrower N block. Every variant is checked against the float32 product of the
dequantized weight before it is timed.

Device time per call: 50 calls chained in one jitted loop (no host dispatch between them), over
enough copies of the weight (>= 256 MiB in all) that no call finds its weight in L2. "/ BW" divides
the weight bytes by the time and by the read bandwidth measured in the same run.

    python scripts/benchmark_quantized_dense.py [--rows 1 4 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib

import jax
import jax.numpy as jnp
from jax import lax

from vishwam_jax.models.layers import linear
from vishwam_jax.pallas_kernels import _gmm_gpu
from vishwam_jax.quantization import QuantizedWeight, quantize
from vishwam_jax.utils.benchmarking import read_bandwidth

SHAPES = {  # name: (K, N)
    "gemma-2b gate/up": (2048, 16384),
    "gemma-2b down": (16384, 2048),
    "gemma3-27b gate/up": (5376, 21504),
    "gemma3-27b down": (21504, 5376),
    "DSv3 wq_a": (7168, 1536),
    "DSv3 wkv_a": (7168, 576),
    "DSv3 dense gate/up": (7168, 18432),
    "DSv3 dense down": (18432, 7168),
    "DSv3 shared down": (2048, 7168),
}
SPEC = "md,df->mf"
COLD_BYTES = 256 << 20  # twice and more the L2 of an H100 / H200
CALLS = 50


def per_call_us(f, x, weights: list) -> float:
    """Device-bound µs per call of f(x, w): CALLS calls in one jitted loop, cycling through `weights`
    (distinct buffers, so that each call streams its weight from HBM)."""
    rounds = max(1, CALLS // len(weights))

    def loop(x, weights):
        def body(i, acc):  # each call's input depends on the step, so none is hoisted
            xi = x + (i * 0).astype(x.dtype)
            for w in weights:
                acc = acc + f(xi, w)[0, 0].astype(jnp.float32)
            return acc

        return lax.fori_loop(0, rounds, body, jnp.float32(0))

    g = jax.jit(loop)
    jax.block_until_ready(g(x, weights))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(g(x, weights))
        best = min(best, (time.perf_counter() - start) / (rounds * len(weights)))
    return best * 1e6


def copies(w, nbytes: int) -> list:
    """`w` and enough distinct copies of it to hold COLD_BYTES in all (at most CALLS)."""
    return [w] + [jax.tree.map(jnp.copy, w) for _ in range(min(CALLS, -(-COLD_BYTES // nbytes)) - 1)]


def kernel_variant(cfg_change: dict):
    """linear() of a K-major int8 / fp8 weight on the grouped-matmul kernel with its block config
    changed (K then split as the default would, unless the change says how)."""

    def f(x, w: QuantizedWeight):
        m, k = x.shape
        n = w.values.shape[0]
        one = jnp.full((1,), m, jnp.int32)
        cfg = _gmm_gpu.gmm_config(m, k, n, 1, 2, 1)
        if w.format == "fp8":
            cfg = _gmm_gpu.fit_block_scaled(cfg, *w.block)
        cfg = dataclasses.replace(cfg, **cfg_change)
        if "k_splits" not in cfg_change:
            cfg = _gmm_gpu.split_k(cfg, m, k, n, 1)
        if w.format == "int8":
            scale = w.scale.reshape(1, n)
            return _gmm_gpu.gmm(x, w.values[None], one, transpose_rhs=True, rhs_scale=scale, config=cfg)
        return _gmm_gpu.gmm_block_scaled(
            x, w.values[None], one, w.scale[None], block=w.stored_block, transpose_rhs=True, config=cfg
        )

    return f


GMM_VARIANTS = {  # the grouped-matmul kernel on K-major weights with one group, default and narrower N blocks
    "gmm kernel": {},
    "gmm kernel, bn 64": dict(bn=64),
}
VARIANT_ROWS = 8  # decode-sized calls also time the kernel variants


def measure(name: str, k: int, n: int, m: int, bandwidth: float, variants: bool = True) -> dict:
    """One row: every route and variant at `m` rows of [k, n], checked, then timed."""
    key = jax.random.key(zlib.crc32(name.encode()))  # the same weights in every run (str hashes are salted)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    w32 = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.float32) * 0.02
    row = {"shape": name, "k": k, "n": n, "rows": m}
    plain = lambda x, w: linear(x, w, SPEC)  # noqa: E731
    cells = {"bf16": (w32.astype(jnp.bfloat16), 2 * k * n, plain)}
    for fmt in ("int8", "fp8"):
        for k_major in (False, True):
            values, scale = quantize(w32, fmt, (1, 1), k_major=k_major)
            w = QuantizedWeight(values, scale, fmt, (1, 1), k_major=k_major)
            cells[f"{fmt} {'K-major' if k_major else '[k, n]'}"] = (w, k * n, plain)
            for label, change in GMM_VARIANTS.items() if k_major and variants and m <= VARIANT_ROWS else ():
                cells[f"{fmt} K-major, {label}"] = (w, k * n, kernel_variant(change))
    x32 = x.astype(jnp.float32)
    for label, (w, nbytes, f) in cells.items():
        want = x32 @ (w.dequantize(jnp.float32) if isinstance(w, QuantizedWeight) else w.astype(jnp.float32))
        got = jax.jit(f)(x, w).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        if not err < 2e-2:
            raise SystemExit(f"error: {name} rows={m} {label}: relative error {err:.2e} against the float32 product")
        us = per_call_us(f, x, copies(w, nbytes))
        row[label] = {"us": us, "read_bw_fraction": nbytes / (us * 1e-6) / bandwidth, "rel_err": err}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 2048])
    p.add_argument("--no-variants", action="store_true", help="time only the routes the models take")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; rows past it are skipped")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("error: this benchmark times the GPU kernels; no GPU here", file=sys.stderr)
        return 2
    bw = read_bandwidth()
    print(bw.describe(), flush=True)
    rows, start = [], time.perf_counter()
    for m in args.rows:
        for name in args.shapes:
            if time.perf_counter() - start > args.time_budget:
                print(f"time budget spent: {name} at {m} rows and after not measured", flush=True)
                break
            k, n = SHAPES[name]
            row = measure(name, k, n, m, bw.bytes_per_s, variants=not args.no_variants)
            rows.append(row)
            bf16 = row["bf16"]["us"]
            cells = " | ".join(
                f"{label} {c['us']:.1f} µs ({c['read_bw_fraction']:.2f} BW, {bf16 / c['us']:.2f}x)"
                for label, c in row.items()
                if isinstance(c, dict)
            )
            print(f"{name} K={k} N={n} rows={m} | {cells}", flush=True)
            if args.json:  # after every row, so that a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    out = {"read_bandwidth": dataclasses.asdict(bw), "device": jax.devices()[0].device_kind}
                    json.dump({**out, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
