"""What our grouped-matmul kernels compile to on Hopper, from a CPU: lower each kernel with Pallas'
Triton rules, compile it with the pip `triton` package for sm_90, and count the SASS instructions
that decide its speed. No GPU is needed; the numbers are instruction counts, not timings, and come
from the pip Triton, not from the one inside jaxlib (see vishwam_jax/utils/kernel_inspection.py).

    pip install triton && python scripts/kernel_sass.py

Columns: the matrix instruction (QGMMA: FP8 wgmma; HGMMA: 16-bit wgmma; HMMA: the older mma.sync),
shared-memory loads of single bytes (LDS.U8/S8: a 1-byte operand laid out along N, which ldmatrix
cannot transpose), ldmatrix loads (LDSM), 16-byte global loads, and integer/float conversions that
run at a quarter rate or less (I2F, F2F). Asynchronous copies (LDGSTS) are how Triton keeps tiles in
flight across K steps; a kernel with none loads every tile synchronously.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from vishwam_jax.pallas_kernels import _gmm_gpu, grouped_matmul
from vishwam_jax.utils import kernel_inspection

E4M3 = jnp.float8_e4m3fn
G, K, N = 8, 7168, 4096  # DeepSeek-V3's expert up/gate projection, 8 experts
GPU = dict(implementation="pallas_gpu")


def cases(decode_rows: int, prefill_rows: int) -> dict:
    def gs(m):
        return jnp.full((G,), m // G, jnp.int32)

    def zeros(*shape, dtype=jnp.bfloat16):
        return jnp.zeros(shape, dtype)

    d, p = decode_rows, prefill_rows
    blocks_kn, blocks_nk = (
        zeros(G, K // 128, N // 128, dtype=jnp.float32),
        zeros(G, N // 128, K // 128, dtype=jnp.float32),
    )
    per_channel = zeros(G, 1, N, dtype=jnp.float32)
    x8, x_scale = zeros(p, K, dtype=E4M3), zeros(p, K // 128, dtype=jnp.float32)

    def bf16(x, w, g):
        return grouped_matmul.gmm(x, w, g, **GPU)

    return {
        "bf16 weights [k, n], decode": (bf16, zeros(d, K), zeros(G, K, N), gs(d)),
        "int8 weights [k, n], decode": (
            lambda x, w, s, g: grouped_matmul.gmm(x, w, g, rhs_scale=s, **GPU),
            zeros(d, K), zeros(G, K, N, dtype=jnp.int8), per_channel, gs(d),
        ),
        "int8 weights [n, k], decode": (
            lambda x, w, s, g: grouped_matmul.gmm(x, w, g, rhs_scale=s, transpose_rhs=True, **GPU),
            zeros(d, K), zeros(G, N, K, dtype=jnp.int8), per_channel.reshape(G, N, 1), gs(d),
        ),
        "fp8 weights [k, n], decode": (
            lambda x, w, s, g: grouped_matmul.gmm(x, w, g, rhs_scale=s, rhs_scale_block=(128, 128), **GPU),
            zeros(d, K), zeros(G, K, N, dtype=E4M3), blocks_kn, gs(d),
        ),
        "fp8 weights [n, k], decode": (
            lambda x, w, s, g: grouped_matmul.gmm(
                x, w, g, rhs_scale=s, rhs_scale_block=(128, 128), transpose_rhs=True, **GPU
            ),
            zeros(d, K), zeros(G, N, K, dtype=E4M3), blocks_nk, gs(d),
        ),
        "bf16 x bf16, prefill": (bf16, zeros(p, K), zeros(G, K, N), gs(p)),
        "fp8 x fp8 [k, n], prefill": (
            lambda x, xs, w, s, g: grouped_matmul.gmm_fp8(x, xs, w, s, g, **GPU),
            x8, x_scale, zeros(G, K, N, dtype=E4M3), blocks_kn, gs(p),
        ),
        "fp8 x fp8 [n, k], prefill": (
            lambda x, xs, w, s, g: grouped_matmul.gmm_fp8(x, xs, w, s, g, transpose_rhs=True, **GPU),
            x8, x_scale, zeros(G, N, K, dtype=E4M3), blocks_nk, gs(p),
        ),
        "tgmm_fp8 (weight gradient)": (
            lambda x, xs, dy, dys, g: grouped_matmul.tgmm_fp8(x, xs, dy, dys, g, **GPU),
            zeros(p, K, dtype=E4M3), zeros(p // 128, K, dtype=jnp.float32),
            zeros(p, N, dtype=E4M3), zeros(p // 128, N, dtype=jnp.float32), gs(p),
        ),
        "tgmm_fp8, tokens last (FP8 training's wgrad)": (
            lambda x, xs, dy, dys, g: grouped_matmul.tgmm_fp8(x, xs, dy, dys, g, tokens_last=True, **GPU),
            zeros(K, p, dtype=E4M3), zeros(p // 128, K, dtype=jnp.float32),
            zeros(N, p, dtype=E4M3), zeros(p // 128, N, dtype=jnp.float32), gs(p),
        ),
    }  # fmt: skip


def summarize(counts: dict[str, int]) -> dict[str, str]:
    def total(prefixes):
        return sum(c for op, c in counts.items() if op.startswith(prefixes))

    mma = sorted((op for op in counts if op.startswith(("QGMMA", "HGMMA", "HMMA", "IMMA"))), key=lambda o: -counts[o])
    return {
        "matrix instruction": ", ".join(f"{op} ×{counts[op]}" for op in mma) or "none",
        "LDS.U8/S8": str(total(("LDS.U8", "LDS.S8"))),
        "LDSM": str(total(("LDSM",))),
        "16-byte global loads": str(total(("LDGSTS.E.BYPASS.128", "LDG.E.128"))),
        "of them asynchronous (LDGSTS)": str(total(("LDGSTS",))),
        "byte loads (LDG.E.U8)": str(total(("LDG.E.U8", "LDG.E.S8"))),
        "I2F + F2F": str(total(("I2F", "F2F."))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-rows", type=int, default=8)
    ap.add_argument("--prefill-rows", type=int, default=8192)
    ap.add_argument("--only", default="", help="substring of the case names to run")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: this script compiles with the `triton` package: pip install triton", file=sys.stderr)
        return 2
    print(f"Triton {triton.__version__}, sm_90; G={G} K={K} N={N}; {_gmm_gpu.__name__} as lowered by Pallas\n")
    header = None
    for name, (fn, *inputs) in cases(args.decode_rows, args.prefill_rows).items():
        if args.only not in name:
            continue
        for kernel, module, warps, stages in kernel_inspection.triton_modules(fn, *inputs):
            row = summarize(kernel_inspection.sass_instruction_counts(module, warps, stages))
            if header is None:
                header = ["case", "kernel", *row]
                print("| " + " | ".join(header) + " |")
                print("|" + "---|" * len(header))
            print(f"| {name} | {kernel} | " + " | ".join(row.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
