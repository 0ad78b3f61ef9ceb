"""Weight-only quantized matmul on CPU: our QuantizedWeight linear against Qwix's (google/qwix) einsum.

    python scripts/benchmark_qwix.py [--tokens 32] [--dim 4096] [--repeats 20]

Qwix is optional (pip install qwix); the numbers go into docs/quantization.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vishwam_jax.models.layers import linear
from vishwam_jax.quantization import QuantizedWeight, quantize


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import qwix

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((args.dim, args.dim)), jnp.float32) / np.sqrt(args.dim)
    x = jnp.asarray(rng.standard_normal((args.tokens, args.dim)), jnp.float32)
    dense = jax.jit(lambda x, w: linear(x, w, "td,df->tf"))
    print(f"CPU {jax.devices()[0].device_kind}, x [{args.tokens}, {args.dim}] f32 @ w [{args.dim}, {args.dim}]")
    print(f"float32 weights                      {timed(dense, x, w, repeats=args.repeats):8.2f} ms")
    ours = jax.jit(lambda x, qw: linear(x, qw, "td,df->tf"))
    cases = (
        ("int8", jnp.int8, dict(channelwise_axes=[1])),
        ("fp8", jnp.float8_e4m3fn, dict(channelwise_axes=[1], tiled_axes={0: 128})),  # Qwix's subchannel rule
        ("fp8", jnp.float8_e4m3fn, dict(tiled_axes={0: 128, 1: 128})),  # DeepSeek's blocks, core API only
    )
    for fmt, qtype, how in cases:
        block = (128, 128)
        values, scale = quantize(w, fmt, (1, 1), block)
        qw = QuantizedWeight(values, scale, fmt, (1, 1), block)
        ref = dense(x, qw.dequantize(jnp.float32))
        t_ours = timed(ours, x, qw, repeats=args.repeats)
        # Weight-only on both sides (no activation quantization).
        qarray = qwix.quantize(w, qtype, **how)
        theirs = jax.jit(lambda x, q: qwix.dot_general(x, q, (((1,), (0,)), ((), ()))))
        t_qwix = timed(theirs, x, qarray, repeats=args.repeats)
        err_ours = float(jnp.abs(ours(x, qw) - ref).max())
        err_qwix = float(jnp.abs(theirs(x, qarray) - dense(x, w)).max())
        err_float = float(jnp.abs(ours(x, qw) - dense(x, w)).max())
        print(
            f"{fmt:5s} qwix {how}\n      ours {t_ours:8.2f} ms   qwix {t_qwix:8.2f} ms   "
            f"max|ours - float| {err_float:.2e}  max|qwix - float| {err_qwix:.2e}  "
            f"(ours vs its definition {err_ours:.1e})"
        )


if __name__ == "__main__":
    main()
