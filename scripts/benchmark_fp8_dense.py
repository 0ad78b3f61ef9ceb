"""Batch-1 dense projections of DeepSeek-V3 with fp8 weights on the one-group block-scaled kernel,
beside the bf16 matmul XLA runs: block configs and both weight layouts ([k, n] as we store it, and
K-major [n, k] as DeepSeek ships it). Device time of 50 calls in one jitted loop, per call.

    python scripts/benchmark_fp8_dense.py
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from vishwam_jax.pallas_kernels import _gmm_gpu
from vishwam_jax.quantization import quantize

SHAPES = {  # name: (K, N)
    "wq_a 7168x1536": (7168, 1536),
    "wq_b 1536x24576": (1536, 24576),
    "wo 16384x7168": (16384, 7168),
    "dense up 7168x18432": (7168, 18432),
    "dense down 18432x7168": (18432, 7168),
    "shared up 7168x2048": (7168, 2048),
}


def per_call_us(f, *args, calls: int = 50) -> float:
    """Device-bound time per call: `calls` calls chained in one jitted loop (no host dispatch)."""

    def loop(x, *rest):
        def body(i, acc):  # each call's input depends on the step, so none is hoisted
            return acc + f(x + (i * 0).astype(x.dtype), *rest)[0, 0].astype(jnp.float32)

        return lax.fori_loop(0, calls, body, jnp.float32(0))

    g = jax.jit(loop)
    jax.block_until_ready(g(*args))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(g(*args))
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> int:
    if jax.default_backend() != "gpu":
        print("error: this benchmark times the GPU kernel; no GPU here", file=sys.stderr)
        return 2
    one = jnp.ones((1,), jnp.int32)
    for name, (k, n) in SHAPES.items():
        x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02
        values, scale = quantize(w, "fp8", (1, 1), (128, 128))
        rows = {"bf16 (XLA)": (per_call_us(lambda x, w: x @ w, x, w.astype(jnp.bfloat16)), 2 * k * n)}
        del w
        default = _gmm_gpu.fit_block_scaled(_gmm_gpu.gmm_config(1, k, n, 1, 2, 1), 128, 128)  # before split_k
        configs = {
            "default (split K)": _gmm_gpu.split_k(default, 1, k, n, 1),
            "one pass": default,
            "bn 64, 6 stages": dataclasses.replace(default, bn=64, num_stages=6),
            "bn 32, 6 stages": dataclasses.replace(default, bn=32, num_stages=6),
        }
        for label, cfg in configs.items():
            layouts = {"[k, n]": (values, scale, False), "[n, k]": (values.T, scale.T, True)}
            for layout, (v, s, transpose) in layouts.items():

                def fp8(x, v, s, cfg=cfg, transpose=transpose):
                    return _gmm_gpu.gmm_block_scaled(
                        x, v[None], one, s[None], block=(128, 128), transpose_rhs=transpose, config=cfg
                    )

                rows[f"{label} {layout}"] = (per_call_us(fp8, x, v, s), k * n)
        cells = " | ".join(f"{key}: {us:.1f} µs ({nbytes / us / 1e3:.0f} GB/s)" for key, (us, nbytes) in rows.items())
        print(f"{name} | {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
