"""Grouped-matmul benchmark (GPU): our Pallas gmm vs jax.lax.ragged_dot, JAX's Mosaic-GPU ragged_dot
example and a dense bf16 matmul of the same FLOPs; decode sizes against measured copy bandwidth.

    python scripts/benchmark_gmm.py            # full shape set (DeepSeek-V3, Grok-1, decode)
    python scripts/benchmark_gmm.py --quick    # reduced set
    python scripts/benchmark_gmm.py --tune     # time a few block configs per regime, then exit

Every shape is first checked against an exact float32 product (the rows of a few groups, and the
zero rows past sum(group_sizes)), and a medium problem is checked in full against gmm_reference,
with transpose_rhs, int8 weights, tgmm and both gradients. Any mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_kernels():
    """The kernel modules; if the package's __init__ cannot import (missing optional dependencies on
    a bare GPU box), load the two modules alone under stub parent packages."""
    try:
        from vishwam_jax.pallas_kernels import _gmm_gpu, grouped_matmul

        return _gmm_gpu, grouped_matmul
    except Exception as e:  # noqa: BLE001
        print(f"(package import failed: {type(e).__name__}: {e}; loading the kernel modules directly)")
    import importlib.util
    import types

    for name in ("vishwam_jax", "vishwam_jax.pallas_kernels"):
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(ROOT / name.replace(".", "/"))]
        sys.modules[name] = pkg
    mods = []
    for name in ("_gmm_gpu", "grouped_matmul"):
        spec = importlib.util.spec_from_file_location(f"vishwam_jax.pallas_kernels.{name}",
                                                      ROOT / "vishwam_jax/pallas_kernels" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return tuple(mods)


_gmm_gpu, grouped_matmul = _import_kernels()

TOL = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float32): 2e-3}


# ---------------------------------------------------------------------------------------------
# Timing and ceilings


def time_fn(fn, *args, inner: int = 5, reps: int = 7, budget_s: float = 20.0) -> float:
    """Median seconds per call: `inner` calls queued back to back per sample (hides the host sync),
    `reps` samples after a compile + warm-up call. Stops early when a call is very slow."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    if first * inner * reps > budget_s:
        inner, reps = 1, max(1, min(reps, int(budget_s / max(first, 1e-9))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device copy (bytes read + bytes written), random data."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.bfloat16)
    fn = jax.jit(lambda a: a * 2)  # a copy XLA cannot elide
    return 2 * x.nbytes / time_fn(fn, x, inner=10)


def dense_seconds(m: int, k: int, n: int) -> float:
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (m, k), jnp.bfloat16)
    b = jax.random.normal(kb, (k, n), jnp.bfloat16)
    return time_fn(jax.jit(lambda x, y: x @ y), a, b)


# ---------------------------------------------------------------------------------------------
# Problems


def group_sizes_for(m: int, g: int, kind: str, seed: int, top_k: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "balanced":
        sizes = np.full(g, m // g)
        sizes[: m - sizes.sum()] += 1
    elif kind == "zipf":  # expert popularity ~ 1/rank^1.2, experts in random order
        p = 1.0 / np.arange(1, g + 1) ** 1.2
        sizes = rng.multinomial(m, rng.permutation(p / p.sum()))
    elif kind == "decode":  # every token picks min(top_k, g) distinct experts
        tokens = m // top_k
        picks = np.stack([rng.choice(g, size=min(top_k, g), replace=False) for _ in range(tokens)])
        sizes = np.bincount(picks.ravel(), minlength=g)
        if sizes.sum() < m:  # top_k > g: the remaining rows are padding rows (zero in the output)
            pass
    else:
        raise ValueError(kind)
    return sizes.astype(np.int32)


@dataclasses.dataclass
class Problem:
    name: str
    g: int
    k: int
    n: int
    m: int
    dist: str
    decode: bool = False


def problems(quick: bool) -> list[Problem]:
    out = []
    for g in (256, 32):
        for k, n in ((7168, 4096), (2048, 7168)):
            if quick and k == 2048:
                continue
            tokens = {256: [2048, 8192], 32: [8192]}[g] if quick else [512, 2048, 8192, 16384]
            for t in tokens:
                for dist in ("balanced", "zipf"):
                    out.append(Problem(f"DSv3 G={g} K={k} N={n}", g, k, n, 8 * t, dist))
    for k, n in [(6144, 65536)] if quick else [(6144, 65536), (32768, 6144)]:
        for dist in ("balanced", "zipf"):
            out.append(Problem(f"Grok-1 G=8 K={k} N={n}", 8, k, n, 16384, dist))
    decode = [(256, 7168, 4096, (1, 64)), (8, 6144, 65536, (8,))] if quick else [
        (256, 7168, 4096, (1, 8, 64)), (256, 2048, 7168, (1, 8, 64)), (8, 6144, 65536, (1, 8, 64))]
    for g, k, n, tokens in decode:
        for t in tokens:
            out.append(Problem(f"decode G={g} K={k} N={n}", g, k, n, 8 * t, "decode", decode=True))
    return out


# ---------------------------------------------------------------------------------------------
# Checks


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def spot_check(out, lhs, rhs, sizes: np.ndarray, scale=None) -> float:
    """Exact float32 product for the rows of the largest, the smallest non-empty and a random group,
    plus the rows past sum(group_sizes) (must be exactly zero). Returns the worst relative error."""
    ends = np.cumsum(sizes)
    starts = ends - sizes
    nonempty = np.flatnonzero(sizes)
    picks = {int(np.argmax(sizes)), int(nonempty[np.argmin(sizes[nonempty])]),
             int(np.random.default_rng(0).choice(nonempty))}
    worst = 0.0
    for gi in picks:
        rows = slice(int(starts[gi]), int(ends[gi]))
        w = rhs[gi].astype(jnp.float32)
        if scale is not None:
            w = w * scale[gi].reshape(1, -1)
        ref = jnp.dot(lhs[rows].astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        worst = max(worst, rel_err(out[rows], ref))
    tail = np.asarray(out[int(ends[-1]):], np.float32)
    if tail.size and np.any(tail != 0):
        worst = float("inf")
    return worst


def full_checks() -> list[str]:
    try:
        return _full_checks()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return [f"full checks raised {short(e)}"]


def _full_checks() -> list[str]:
    """Medium problems against gmm_reference: every option and both gradients, compiled kernels."""
    failures = []
    key = iter(jax.random.split(jax.random.key(42), 32))
    m, k, n = 1000, 512, 384
    sizes = np.array([0, 130, 0, 257, 64, 1, 300, 0], np.int32)  # sum < m, empty first/last groups
    g = len(sizes)
    gs = jnp.asarray(sizes)
    for dtype in (jnp.bfloat16, jnp.float32):
        lhs = jax.random.normal(next(key), (m, k), dtype)
        for transpose in (False, True):
            rhs = jax.random.normal(next(key), (g, n, k) if transpose else (g, k, n), dtype)
            got = jax.jit(functools.partial(grouped_matmul.gmm, transpose_rhs=transpose))(lhs, rhs, gs)
            ref = grouped_matmul.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose)
            err = rel_err(got, ref)
            print(f"  check gmm {jnp.dtype(dtype).name} transpose={transpose}: rel err {err:.2e}")
            if not err < TOL[jnp.dtype(dtype)]:
                failures.append(f"gmm {dtype} transpose={transpose}: {err}")
    lhs = jax.random.normal(next(key), (m, k), jnp.bfloat16)
    q = jax.random.randint(next(key), (g, k, n), -127, 128, jnp.int8)
    scale = jax.random.uniform(next(key), (g, 1, n), jnp.float32, 0.005, 0.02)
    got = jax.jit(lambda a, b, s: grouped_matmul.gmm(a, b, gs, rhs_scale=s))(lhs, q, scale)
    err = rel_err(got, grouped_matmul.gmm_reference(lhs, q, gs, rhs_scale=scale))
    print(f"  check gmm int8: rel err {err:.2e}")
    if not err < 2e-2:
        failures.append(f"gmm int8: {err}")
    grad = jax.random.normal(next(key), (m, n), jnp.bfloat16)
    got = jax.jit(lambda a, b: grouped_matmul.tgmm(a, b, gs, num_groups=g))(lhs, grad)
    err = rel_err(got, grouped_matmul.tgmm_reference(lhs, grad, gs, num_groups=g))
    print(f"  check tgmm: rel err {err:.2e}")
    if not err < 2e-2:
        failures.append(f"tgmm: {err}")
    rhs = jax.random.normal(next(key), (g, k, n), jnp.float32) / np.sqrt(k)
    lhs32 = lhs.astype(jnp.float32)

    def loss(fn, a, b):
        return jnp.sum(jnp.sin(fn(a, b, gs)))

    got = jax.jit(jax.grad(functools.partial(loss, grouped_matmul.gmm), argnums=(0, 1)))(lhs32, rhs)
    ref = jax.grad(functools.partial(loss, grouped_matmul.gmm_reference), argnums=(0, 1))(lhs32, rhs)
    for name, a, b in zip(("d lhs", "d rhs"), got, ref):
        err = rel_err(a, b)
        print(f"  check grad {name}: rel err {err:.2e}")
        if not err < 2e-3:
            failures.append(f"grad {name}: {err}")
    return failures


# ---------------------------------------------------------------------------------------------
# Contenders


def ours(lhs, rhs, gs, scale=None, config=None):
    if config is None:
        return grouped_matmul.gmm(lhs, rhs, gs, rhs_scale=scale, implementation="pallas_gpu")
    return _gmm_gpu.gmm(lhs, rhs, gs, rhs_scale=None if scale is None else scale.reshape(scale.shape[0], -1),
                        config=config)


def xla_ragged(lhs, rhs, gs):
    return jax.lax.ragged_dot(lhs, rhs, gs)


def mgpu_candidates(p: Problem):
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception as e:  # noqa: BLE001
        return f"not importable: {type(e).__name__}"
    configs = []
    # One warpgroup holds the block_m x block_n float32 accumulator, so 128x128 is its largest
    # sensible tile; a 64-row tile when groups hold few rows.
    block_m = 64 if p.m / p.g < 64 else 128
    for gbn in MGPU_GRID_BLOCK_N:
        if p.k % 64 == 0 and p.n % (128 * gbn) == 0:
            configs.append(dict(block_m=block_m, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=gbn))
    return [(c, functools.partial(ragged_dot_mgpu.ragged_dot, **c)) for c in configs]


MGPU_GRID_BLOCK_N = (4,)


def short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:110]


def run_problem(p: Problem, rhs, copy_bw: float, args) -> dict:
    sizes = group_sizes_for(p.m, p.g, p.dist, seed=p.m + p.g)
    gs = jnp.asarray(sizes)
    total = int(sizes.sum())
    lhs = jax.random.normal(jax.random.key(p.m), (p.m, p.k), jnp.bfloat16)
    flops = 2.0 * total * p.k * p.n
    row = dict(shape=p.name, m=p.m, dist=p.dist, active=int(np.count_nonzero(sizes)))
    f_ours = jax.jit(ours)
    out = f_ours(lhs, rhs, gs)
    err = spot_check(out, lhs, rhs, sizes)
    row["err"] = err
    if not err < TOL[jnp.dtype(jnp.bfloat16)]:
        row["FAIL"] = f"mismatch {err}"
    t = time_fn(f_ours, lhs, rhs, gs)
    row["ours_ms"] = t * 1e3
    row["ours_tflops"] = flops / t / 1e12
    weight_bytes = row["active"] * p.k * p.n * 2
    row["weight_GBps"] = weight_bytes / t / 1e9
    row["roofline_ms"] = 1e3 * max(flops / args.peak_flops, (weight_bytes + 2 * total * (p.k + p.n)) / copy_bw)
    if p.decode:
        q = jax.random.randint(jax.random.key(7), rhs.shape, -127, 128, jnp.int8)
        scale = jax.random.uniform(jax.random.key(8), (p.g, 1, p.n), jnp.float32, 0.005, 0.02)
        out8 = f_ours(lhs, q, gs, scale)
        err8 = spot_check(out8, lhs, q, sizes, scale.reshape(p.g, p.n))
        if not err8 < 2e-2:
            row["FAIL"] = f"int8 mismatch {err8}"
        t8 = time_fn(f_ours, lhs, q, gs, scale)
        row["int8_ms"] = t8 * 1e3
        row["int8_weight_GBps"] = weight_bytes / 2 / t8 / 1e9
        del q
    if not args.skip_others:
        try:
            f = jax.jit(xla_ragged)
            rel = rel_err(f(lhs, rhs, gs), out)
            tr = time_fn(f, lhs, rhs, gs, budget_s=3)
            row["ragged_dot_tflops"] = flops / tr / 1e12
            row["ragged_dot_ms"] = tr * 1e3
            row["ragged_dot_vs_ours_err"] = rel
        except Exception as e:  # noqa: BLE001
            row["ragged_dot"] = "fails: " + short(e)
        cands = mgpu_candidates(p)
        if isinstance(cands, str):
            row["mgpu"] = cands
        else:
            best, best_cfg, errs = None, None, []
            for cfg, fn in cands:
                try:
                    f = jax.jit(lambda a, b, c, fn=fn: fn(a, b, group_sizes=c))
                    r = f(lhs, rhs, gs)
                    e = spot_check(r, lhs, rhs, sizes)
                    tm = time_fn(f, lhs, rhs, gs, reps=5, budget_s=3)
                    if best is None or tm < best:
                        best, best_cfg = tm, cfg
                    row["mgpu_err"] = e
                except Exception as e:  # noqa: BLE001
                    errs.append(short(e))
            if best is None:
                row["mgpu"] = "fails: " + (errs[0] if errs else "no config fits")
            else:
                row["mgpu_tflops"] = flops / best / 1e12
                row["mgpu_ms"] = best * 1e3
                row["mgpu_cfg"] = "{block_m}x{block_n}x{block_k}/s{max_concurrent_steps}/gbn{grid_block_n}".format(**best_cfg)
    if not p.decode:
        td = dense_seconds(p.m, p.k, p.n)
        row["dense_tflops"] = 2.0 * p.m * p.k * p.n / td / 1e12
    if args.train and not p.decode and p.dist == "balanced":
        # The two backward products: d lhs = gmm(grad, rhs^T) and d rhs = tgmm(lhs, grad).
        grad = jax.random.normal(jax.random.key(9), (p.m, p.n), jnp.bfloat16)
        f_t = jax.jit(lambda a, b, c: grouped_matmul.gmm(a, b, c, transpose_rhs=True))
        row["dlhs_tflops"] = flops / time_fn(f_t, grad, rhs, gs) / 1e12
        f_tg = jax.jit(lambda a, b, c: grouped_matmul.tgmm(a, b, c, num_groups=p.g))
        dw = f_tg(lhs, grad, gs)
        gi = int(np.argmax(sizes))
        s0 = int(np.cumsum(sizes)[gi] - sizes[gi])
        ref = jnp.dot(lhs[s0:s0 + sizes[gi]].astype(jnp.float32).T, grad[s0:s0 + sizes[gi]].astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
        e = rel_err(dw[gi], ref)
        if not e < 2e-2:
            row["FAIL"] = f"tgmm mismatch {e}"
        row["drhs_tflops"] = flops / time_fn(f_tg, lhs, grad, gs) / 1e12
        del grad, dw
    return row


# ---------------------------------------------------------------------------------------------
# Tuning


TUNE = {
    "large": [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
              (128, 128, 128, 8, 3), (64, 256, 64, 4, 3)],
    "medium": [(64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4),
               (64, 64, 128, 4, 4)],
    "small": [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 128, 128, 4, 4), (16, 64, 256, 4, 3),
              (16, 128, 256, 4, 3), (32, 64, 128, 4, 5)],
}


def tune(args) -> None:
    cases = [
        ("large", Problem("DSv3", 32, 7168, 4096, 65536, "balanced")),
        ("large", Problem("DSv3", 256, 7168, 4096, 65536, "balanced")),
        ("medium", Problem("DSv3", 256, 7168, 4096, 16384, "balanced")),
        ("small", Problem("DSv3", 256, 7168, 4096, 4096, "balanced")),
        ("small", Problem("decode", 256, 7168, 4096, 512, "decode")),
        ("small", Problem("decode", 256, 7168, 4096, 64, "decode")),
        ("small", Problem("decode", 8, 6144, 65536, 64, "decode")),
    ]
    rhs_cache = {}
    for regime, p in cases:
        shape = (p.g, p.k, p.n)
        if shape not in rhs_cache:
            rhs_cache.clear()
            rhs_cache[shape] = jax.random.normal(jax.random.key(3), shape, jnp.bfloat16)
        rhs = rhs_cache[shape]
        sizes = group_sizes_for(p.m, p.g, p.dist, seed=1)
        gs = jnp.asarray(sizes)
        lhs = jax.random.normal(jax.random.key(4), (p.m, p.k), jnp.bfloat16)
        flops = 2.0 * sizes.sum() * p.k * p.n
        wbytes = np.count_nonzero(sizes) * p.k * p.n * 2
        auto = _gmm_gpu.gmm_config(p.m, p.k, p.n, p.g, 2)
        for c in TUNE[regime] + [None]:
            cfg = auto if c is None else _gmm_gpu.BlockConfig(*c)
            try:
                f = jax.jit(functools.partial(ours, config=cfg))
                t = time_fn(f, lhs, rhs, gs, inner=3, reps=3)
                print(f"tune {p.name} G={p.g} M={p.m} {regime} {'auto ' if c is None else ''}{cfg}: "
                      f"{t * 1e3:.3f} ms {flops / t / 1e12:.0f} TFLOP/s {wbytes / t / 1e9:.0f} GB/s", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"tune {p.name} M={p.m} {cfg}: fails {short(e)}", flush=True)


# ---------------------------------------------------------------------------------------------


def fmt(v, spec=".0f"):
    if v is None:
        return "-"
    return format(v, spec)


def print_table(rows: list[dict], copy_bw: float) -> None:
    print("\n| shape | M | groups | active | ours ms | ours TFLOP/s | dense TFLOP/s | ours/dense | ragged_dot TFLOP/s "
          "| mgpu example TFLOP/s | roofline ms | ours/roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("m") is None:
            continue
        if "weight_GBps" in r and r["dist"] == "decode":
            continue
        rd = fmt(r.get("ragged_dot_tflops")) if "ragged_dot_tflops" in r else r.get("ragged_dot", "-")
        mg = fmt(r.get("mgpu_tflops")) if "mgpu_tflops" in r else r.get("mgpu", "-")
        dense = r.get("dense_tflops")
        ratio = fmt(r["ours_tflops"] / dense, ".2f") if dense else "-"
        print(f"| {r['shape']} | {r['m']} | {r['dist']} | {r['active']} | {r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | "
              f"{fmt(dense)} | {ratio} | {rd} | {mg} | {r['roofline_ms']:.3f} | "
              f"{r['roofline_ms'] / r['ours_ms']:.2f} |")
    train = [r for r in rows if "drhs_tflops" in r]
    if train:
        print("\nBackward products (balanced): d lhs = gmm(grad, rhs, transpose_rhs=True), d rhs = tgmm(lhs, grad)")
        print("| shape | M | forward TFLOP/s | d lhs TFLOP/s | d rhs (tgmm) TFLOP/s | dense TFLOP/s |")
        print("|---|---|---|---|---|---|")
        for r in train:
            print(f"| {r['shape']} | {r['m']} | {r['ours_tflops']:.0f} | {r['dlhs_tflops']:.0f} | {r['drhs_tflops']:.0f} | "
                  f"{fmt(r.get('dense_tflops'))} |")
    print(f"\nDecode sizes (copy bandwidth measured in this run: {copy_bw / 1e9:.0f} GB/s, read+write)")
    print("| shape | M | active experts | ours ms | weight GB/s | / copy BW | int8 ms | int8 weight GB/s | ragged_dot ms "
          "| mgpu example ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("dist") != "decode":
            continue
        rd = fmt(r.get("ragged_dot_ms"), ".3f") if "ragged_dot_ms" in r else r.get("ragged_dot", "-")
        mg = fmt(r.get("mgpu_ms"), ".3f") if "mgpu_ms" in r else r.get("mgpu", "-")
        print(f"| {r['shape']} | {r['m']} | {r['active']} | {r['ours_ms']:.3f} | {r['weight_GBps']:.0f} | "
              f"{r['weight_GBps'] * 1e9 / copy_bw:.2f} | {fmt(r.get('int8_ms'), '.3f')} | "
              f"{fmt(r.get('int8_weight_GBps'))} | {rd} | {mg} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced shape set")
    ap.add_argument("--tune", action="store_true", help="time block configs per regime and exit")
    ap.add_argument("--skip-others", action="store_true", help="only our kernel and dense (no ragged_dot / mgpu)")
    ap.add_argument("--only", default="", help="substring filter on shape names")
    ap.add_argument("--json", default="", help="write all rows to this file")
    ap.add_argument("--train", action="store_true", help="also time the backward products (balanced shapes)")
    ap.add_argument("--deadline", type=float, default=1e9, help="start no new shape after this many seconds")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if jax.default_backend() != "gpu":
        print("benchmark_gmm.py needs a GPU (the CPU path is covered by tests/test_grouped_matmul.py)")
        return 2
    copy_bw = copy_bandwidth()
    args.peak_flops = 2.0 * 8192**3 / dense_seconds(8192, 8192, 8192)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write); dense bf16 8192^3 {args.peak_flops / 1e12:.0f} "
          "TFLOP/s", flush=True)
    if args.tune:
        tune(args)
        return 0
    failures = full_checks()
    rows = []
    rhs, rhs_shape = None, None
    start = time.perf_counter()
    for p in problems(args.quick):
        if args.only and args.only not in p.name:
            continue
        if time.perf_counter() - start > args.deadline:
            print(f"deadline reached; skipping {p.name} M={p.m} {p.dist}")
            continue
        if rhs_shape != (p.g, p.k, p.n):
            rhs = None
            rhs_shape = (p.g, p.k, p.n)
            rhs = jax.random.normal(jax.random.key(5), rhs_shape, jnp.bfloat16)
        try:
            row = run_problem(p, rhs, copy_bw, args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = dict(shape=p.name, FAIL=short(e))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "FAIL" in row:
            failures.append(f"{p.name} M={p.m} {p.dist}: {row['FAIL']}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(copy_bw=copy_bw, peak=args.peak_flops, rows=rows), indent=1))
    print_table(rows, copy_bw)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
