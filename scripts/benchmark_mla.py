#!/usr/bin/env python
"""Benchmark and check the MLA kernels (vishwam_jax.pallas_kernels.mla_attention) on one GPU.

    python scripts/benchmark_mla.py            # one shape per regime (~4 min on an H100)
    python scripts/benchmark_mla.py --more     # 19 decode + 6 prefill shapes (~9 min); --all: the full grid
    python scripts/benchmark_mla.py --quick    # a subset (a minute or two)
    main(argv) -> exit status, for scripts/benchmark_kernels.py
    python scripts/benchmark_mla.py --tune     # sweep tile configs on representative shapes
    python scripts/benchmark_mla.py --impls pallas_gpu mosaic_gpu --no-prefill   # both GPU kernels side by side

Decode (s_q = 1, bf16, every row's cache full): our kernel vs the XLA einsum form, with achieved
GB/s and TFLOP/s, and the floor max(bytes / read bandwidth, flops / matmul rate) using the read
bandwidth and dense bf16 matmul rate measured in the same run. Every timed op reads its own copy of
the cache (copies rotated until they exceed L2), as each layer of a real model would.
Prefill (causal, bf16, 192/192/128 head dims): ours vs cuDNN vs XLA, forward and forward+backward.

Every kernel result is checked against the float32 reference (decode on the first batch rows,
prefill forward and gradients on one shape); any mismatch makes the exit status 1.

--impls names the decode kernels to time (mla_decode implementations; default pallas_gpu, the first
one is "ours" for the auto column). With more than one, each decode row shows every kernel's µs,
TFLOP/s and fraction of the measured dense matmul rate. A kernel that fails to lower, compile or run
on a shape is reported in one line for that shape and the other kernels' rows go on (exit status 3
if that is the only problem); shapes a kernel does not take (mosaic_gpu: heads % 64) show n/a.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vishwam_jax.pallas_kernels import _flash_prefill, _mla_gpu  # noqa: E402
from vishwam_jax.pallas_kernels import mla_attention as mla  # noqa: E402

D, DV = 576, 512
L2_BYTES = 50 * 2**20
FAILURES: list[str] = []
VERBOSE = False
OURS = "pallas_gpu"  # the CPU smoke test of this script swaps in "pallas_interpret"
EXTRA_IMPLS: list[str] = []  # further decode kernels timed beside OURS (--impls)
ERRORS: list[str] = []  # a kernel that failed to lower / compile / run (not a wrong answer)


def one_line(e: BaseException, n: int = 300) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def decode_supported(impl: str, heads: int, s_q: int = 1) -> bool:
    """Whether a decode implementation takes this head count (the Mosaic GPU kernel: heads % 64)."""
    if impl in ("mosaic_gpu", "mosaic_interpret"):
        from vishwam_jax.pallas_kernels import _mla_mgpu

        return _mla_mgpu.supported((1, s_q, heads, D), (1, 64, D), jnp.bfloat16)
    return True


def log(*a):
    print(*a, flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name: str, err: float, tol: float):
    ok = err <= tol
    if not ok:
        FAILURES.append(f"{name}: rel err {err:.3g} > {tol}")
        log(f"MISMATCH {name}: rel err {err:.3g} > {tol}")
    return ok


def time_fn(fn, args, n_ops: int, reps: int = 5) -> float:
    """Seconds per op. fn runs n_ops independent ops in one jitted call; calls are queued back to back
    (async dispatch, one block at the end) so host overhead hides behind the GPU; median of reps."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if VERBOSE:
        log(f"    (first call incl. compile: {time.perf_counter() - t0:.1f} s, {n_ops} ops)")
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    calls = int(min(max(0.05 / max(one, 1e-6), 2), 100))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)  # one stream, in order: the last one done means all are done
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / calls)
        del out
    return statistics.median(ts) / n_ops


def ceilings() -> tuple[float, float]:
    """(read bandwidth in bytes/s, dense bf16 matmul FLOP/s): `utils.benchmarking.read_bandwidth` (the
    best of XLA reductions and a Pallas streaming read over 4 GiB), and the best of a few 8192^3 products."""
    from vishwam_jax.utils.benchmarking import read_bandwidth

    read = read_bandwidth()
    log(f"measured {read.describe()}")
    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: [a @ b, b @ a, a @ a, b @ b])  # four distinct products: no CSE
    t = time_fn(mm, (a, b), 4, reps=5)
    return read.bytes_per_s, 2 * n**3 / t


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------
def decode_inputs(batch, heads, length, n_ops, n_copies, seed=0):
    """A distinct q per op (identical ops would be merged by XLA's CSE) and n_copies caches."""
    key = jax.random.PRNGKey(seed)
    qs, caches = [], []
    for i in range(n_ops):
        k1, k2, key = jax.random.split(key, 3)
        qs.append(jax.random.normal(k1, (batch, 1, heads, D), jnp.bfloat16))
        if i < n_copies:
            caches.append(jax.random.normal(k2, (batch, length, D), jnp.bfloat16))
    lengths = jnp.full((batch,), length, jnp.int32)
    return qs, caches, lengths


def make_runner(op, n_ops):
    @jax.jit
    def run(qs, caches, lengths):
        return [op(qs[i % len(qs)], caches[i % len(caches)], lengths) for i in range(n_ops)]

    return run


def decode_case(
    batch, heads, length, bw, peak, scale, configs=None, do_xla=True, do_check=True, paged=False, num_splits=None
):
    """paged: the caches become pools of 64-token pages in shuffled order, read through a block table."""
    cache_bytes = batch * length * D * 2
    n_copies = max(1, min(32, math.ceil(2 * L2_BYTES / cache_bytes)))
    n_ops = max(n_copies, 4 if cache_bytes > 2e8 else 16)
    qs, caches, lengths = decode_inputs(batch, heads, length, n_ops, n_copies)
    table = None
    if paged:
        per_row = length // 64
        table = jax.random.permutation(jax.random.PRNGKey(7), batch * per_row).reshape(batch, per_row).astype(jnp.int32)
        caches = [c.reshape(batch * per_row, 64, D) for c in caches]
    flops = 2 * batch * heads * length * (D + DV)
    bytes_ = cache_bytes + batch * heads * (D + DV) * 2
    floor = max(bytes_ / bw, flops / peak)
    res = dict(batch=batch, heads=heads, length=length, floor_us=floor * 1e6, bytes=bytes_, flops=flops, paged=paged)
    results = {}
    nb = min(batch, 4)
    if do_check:
        ref_cache = caches[0][table[:nb]].reshape(nb, length, D) if paged else caches[0][:nb]
        ref = jax.jit(functools.partial(mla.mla_decode_reference, softmax_scale=scale))(
            qs[0][:nb], ref_cache, lengths[:nb]
        )
    default = {"ours": None, **{impl: None for impl in EXTRA_IMPLS if impl != OURS}}
    for name, cfg in (configs or default).items():
        impl = OURS if name == "ours" else name
        if cfg is None and not decode_supported(impl, heads):
            log(f"  {impl}: n/a for {heads} heads")
            continue
        try:
            if cfg is None:
                op = functools.partial(
                    mla.mla_decode, softmax_scale=scale, implementation=impl, block_table=table, num_splits=num_splits
                )
            elif "mgpu" in cfg:  # the Mosaic GPU kernel with explicit knobs (--tune-mgpu)
                from vishwam_jax.pallas_kernels import _mla_mgpu

                op = functools.partial(_mla_mgpu.mla_decode_mgpu, block_table=table, softmax_scale=scale, **cfg["mgpu"])
                op = (lambda f: lambda q, c, l: f(q, c, l)[0])(op)
            else:
                op = functools.partial(
                    _mla_gpu.mla_decode_gpu, block_table=table, softmax_scale=scale, v_head_dim=DV, **cfg
                )
                op = (lambda f: lambda q, c, l: f(q, c, l)[0])(op)
            runner = make_runner(op, n_ops)
            if do_check:  # the timed program's own first output, against the float32 reference
                out = runner(qs, caches, lengths)[0]
                check(
                    f"decode {name} b{batch} h{heads} L{length}{' paged' if paged else ''}",
                    rel_err(out[:nb], ref),
                    2e-2,
                )
            results[name] = time_fn(runner, (qs, caches, lengths), n_ops)
        except Exception as e:  # noqa: BLE001 - report and keep going
            msg = f"decode {impl if cfg is None else name} b{batch} h{heads} L{length}{' paged' if paged else ''}"
            log(f"  FAILED {msg}: {one_line(e)}")
            ERRORS.append(f"{msg}: {one_line(e)}")
            results[name] = float("nan")
    if configs is None and "ours" in results:  # what the model runs (implementation=None)
        if mla._xla_faster(caches[0], table):
            op = functools.partial(mla.mla_decode, softmax_scale=scale, block_table=table)
            results["auto"] = time_fn(make_runner(op, n_ops), (qs, caches, lengths), n_ops)
        else:
            results["auto"] = results["ours"]
    if do_xla:
        try:
            op = functools.partial(mla.mla_decode, softmax_scale=scale, implementation="xla", block_table=table)
            results["xla"] = time_fn(make_runner(op, n_ops), (qs, caches, lengths), n_ops)
        except Exception as e:  # noqa: BLE001
            log(f"  xla failed: {type(e).__name__}: {str(e)[:200]}")
            results["xla"] = float("nan")
    res["times_us"] = {k: v * 1e6 for k, v in results.items()}
    return res


def fmt_decode_row(r, name="ours"):
    t = r["times_us"].get(name, float("nan"))
    x = r["times_us"].get("xla", float("nan"))
    gbs = r["bytes"] / (t * 1e-6) / 1e9
    tfs = r["flops"] / (t * 1e-6) / 1e12
    paged = " paged" if r.get("paged") else ""
    auto = r["times_us"].get("auto", float("nan"))
    return (
        f"| {r['heads']:>3} | {r['batch']:>3} | {r['length'] // 1024:>3}K{paged} | {t:9.1f} | {gbs:7.0f} | "
        f"{tfs:6.0f} | "
        f"{x:9.1f} | {x / t:5.2f}x | {r['floor_us']:7.1f} | {r['floor_us'] / t:5.2f} | {auto:9.1f} |"
    )


def fmt_decode_multi(r, peak):
    """One row, every timed kernel side by side: µs, TFLOP/s, fraction of the dense matmul rate."""
    cells = []
    for name in ["ours"] + [i for i in EXTRA_IMPLS if i != OURS]:
        t = r["times_us"].get(name)
        if t is None:
            cells.append("    n/a |      |      ")
            continue
        tfs = r["flops"] / (t * 1e-6) / 1e12
        cells.append(f"{t:9.1f} | {tfs:4.0f} | {tfs * 1e12 / peak:4.2f}")
    paged = " paged" if r.get("paged") else ""
    x = r["times_us"].get("xla", float("nan"))
    return (
        f"| {r['heads']:>3} | {r['batch']:>3} | {r['length'] // 1024:>3}K{paged} | "
        + " | ".join(cells)
        + f" | {x:9.1f} | {r['floor_us']:7.1f} |"
    )


def decode_multi_header() -> str:
    names = [OURS] + [i for i in EXTRA_IMPLS if i != OURS]
    cols = " | ".join(f"{n} µs | TFLOP/s | / dense" for n in names)
    return (
        f"| heads | batch | cache | {cols} | XLA µs | floor µs |\n|---:|---:|---:|"
        + "---:|---:|---:|" * len(names)
        + "---:|---:|"
    )


def tune_mgpu(bw, peak, scale, shapes):
    """The Mosaic GPU kernel's knobs on each decode shape, every variant checked against the reference
    first: lowering semantics (lane / warpgroup) x Q K^T prefetch at the heuristic's split count, then
    the split count at half, double and 1 (reported only; defaults live in _mla_mgpu / _mla_gpu)."""
    for heads, batch, length, paged in shapes:
        if not decode_supported("mosaic_gpu", heads):
            continue
        auto = _mla_gpu.default_config(heads, batch, length, paged)["num_splits"]
        configs = {
            f"{sem}{' prefetch' if pf else ''} s{auto}": dict(mgpu=dict(semantics=sem, prefetch_qk=pf, num_splits=auto))
            for sem in ("lane", "warpgroup")
            for pf in (False, True)
        }
        for n in sorted({1, max(1, auto // 2), auto * 2} - {auto}):
            configs[f"default s{n}"] = dict(mgpu=dict(num_splits=n))
        r = decode_case(batch, heads, length, bw, peak, scale, configs=configs, do_xla=False, paged=paged)
        log(f"mosaic_gpu h{heads} b{batch} L{length}{' paged' if paged else ''} (auto splits {auto}):")
        for name, t in sorted(r["times_us"].items(), key=lambda kv: kv[1] if kv[1] == kv[1] else 1e18):
            tfs = r["flops"] / (t * 1e-6) / 1e12
            log(f"   {name:>22}: {t:9.1f} µs {tfs:5.0f} TFLOP/s {tfs * 1e12 / peak:5.2f} of dense")


DECODE_HEADER = (
    "| heads | batch | cache | kernel µs | GB/s | TFLOP/s | XLA µs | XLA / kernel | floor µs | floor/kernel "
    "| auto µs |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


# ------------------------------------------------------------------------------------------------
# prefill
# ------------------------------------------------------------------------------------------------
def prefill_inputs(batch, t, heads, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(k1, (batch, t, heads, 192), jnp.bfloat16)
    k = jax.random.normal(k2, (batch, t, heads, 192), jnp.bfloat16)
    v = jax.random.normal(k3, (batch, t, heads, 128), jnp.bfloat16)
    do = jax.random.normal(k4, (batch, t, heads, 128), jnp.bfloat16)
    return q, k, v, do


def prefill_fns(impl, scale, config=None):
    if impl in ("cudnn_native", "cudnn_pad"):
        g = mla._cudnn_prefill_native if impl == "cudnn_native" else mla._cudnn_prefill_padded
        f = functools.partial(g, softmax_scale=scale, causal=True)
    else:
        f = functools.partial(mla.mla_prefill, softmax_scale=scale, causal=True, implementation=impl, config=config)
    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return vjp(do)

    return fwd, fwd_bwd


def prefill_case(batch, t, heads, scale, impls, peak, do_bwd=True):
    q, k, v, do = prefill_inputs(batch, t, heads)
    flops = 2 * batch * heads * t * t * (192 + 128) / 2  # causal: half the score matrix
    out = dict(batch=batch, t=t, heads=heads, flops=flops, fwd={}, fwdbwd={})
    outs = {}
    for name, (impl, cfg) in impls.items():
        if impl == "xla" and batch * heads * t * t * 4 > 8e9:
            out["fwd"][name] = out["fwdbwd"][name] = None  # the [b, h, t, t] scores would not fit
            continue
        try:
            fwd, fwd_bwd = prefill_fns(impl, scale, cfg)
            outs[name] = fwd(q, k, v)
            out["fwd"][name] = time_fn(fwd, (q, k, v), 1, reps=5) * 1e6
            if do_bwd:
                out["fwdbwd"][name] = time_fn(fwd_bwd, (q, k, v, do), 1, reps=5) * 1e6
        except Exception as e:  # noqa: BLE001
            log(f"  prefill {name} b{batch} t{t} h{heads} failed: {type(e).__name__}: {str(e)[:300]}")
            out["fwd"][name] = out["fwdbwd"][name] = float("nan")
    for other in ("cudnn", "cudnn_pad"):
        if "ours" in outs and other in outs:
            check(f"prefill ours vs {other} b{batch} t{t} h{heads}", rel_err(outs["ours"], outs[other]), 2e-2)
    return out


def prefill_check(scale):
    """Forward and dq, dk, dv of the Pallas kernel against jax.grad of the float32 reference."""
    batch, t, heads = 1, 1000, 4  # t not a multiple of any block
    q, k, v, do = prefill_inputs(batch, t, heads, seed=3)
    for impl in ("pallas_gpu", "cudnn_native", "cudnn_pad"):
        try:
            f = prefill_fns(impl, scale)[0]
            o, vjp = jax.vjp(f, q, k, v)
            g = vjp(do)
            fr = functools.partial(mla.mla_prefill_reference, softmax_scale=scale)
            qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
            o_r, vjp_r = jax.vjp(fr, qf, kf, vf)
            g_r = vjp_r(do.astype(jnp.float32))
            check(f"prefill {impl} fwd", rel_err(o, o_r), 2e-2)
            for n, a, b in zip(("dq", "dk", "dv"), g, g_r):
                check(f"prefill {impl} {n}", rel_err(a, b), 3e-2)
            log(
                f"prefill {impl} check: fwd {rel_err(o, o_r):.2e} "
                + " ".join(f"{n} {rel_err(a, b):.2e}" for n, a, b in zip(("dq", "dk", "dv"), g, g_r))
            )
        except Exception as e:  # noqa: BLE001
            msg = f"prefill {impl} check failed: {type(e).__name__}: {str(e)[:400]}"
            log(msg)
            if impl == "pallas_gpu":
                FAILURES.append(msg)


def fmt_prefill_row(r, key):
    cells = []
    for name in ("ours", "cudnn", "cudnn_pad", "xla"):
        v = r[key].get(name, float("nan"))
        cells.append("skip" if v is None else f"{v:9.1f}")
    ours = r[key].get("ours") or float("nan")
    mult = 3.5 if key == "fwdbwd" else 1.0  # bwd = 2.5x fwd matmul work
    tf = r["flops"] * mult / (ours * 1e-6) / 1e12
    best_other = min([x for n, x in r[key].items() if n != "ours" and x is not None and x == x] or [float("nan")])
    return (
        f"| {r['heads']:>3} | {r['batch']} | {r['t'] // 1024}K | "
        + " | ".join(cells)
        + f" | {tf:5.0f} | {best_other / ours:5.2f}x |"
    )


PREFILL_HEADER = (
    "| heads | batch | t | ours µs | cuDNN MLA µs | cuDNN v-padded µs | XLA µs | ours TFLOP/s | "
    "best other / ours |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


# ------------------------------------------------------------------------------------------------
def tune(bw, peak, scale):
    """Compact sweeps; the winners are applied to this process's defaults (and printed, to be
    copied into _mla_gpu / _flash_prefill)."""

    def best(r):
        ok = {k: v for k, v in r["times_us"].items() if k != "xla" and v == v}
        return min(ok, key=ok.get) if ok else None

    def show(r):
        log(f"decode h{r['heads']} b{r['batch']} L{r['length']} floor {r['floor_us']:.1f} µs")
        for name, t in sorted(r["times_us"].items(), key=lambda kv: kv[1] if kv[1] == kv[1] else 1e18):
            log(f"   {name:>16}: {t:9.1f} µs  {r['bytes'] / t / 1e3:6.0f} GB/s  {r['flops'] / t / 1e6:5.0f} TFLOP/s")

    wide = {
        "h64k64w8s2": dict(block_h=64, block_k=64, num_warps=8, num_stages=2),
        "h64k64w16s2": dict(block_h=64, block_k=64, num_warps=16, num_stages=2),
        "h64k32w16s3": dict(block_h=64, block_k=32, num_warps=16, num_stages=3),
        "h64k64w8s2rq": dict(block_h=64, block_k=64, num_warps=8, num_stages=2, reload_q=True),
        "h64k64w16s2rq": dict(block_h=64, block_k=64, num_warps=16, num_stages=2, reload_q=True),
        "h64k64w8s2vs2": dict(block_h=64, block_k=64, num_warps=8, num_stages=2, v_splits=2),
        "h32k64w4s2": dict(block_h=32, block_k=64, num_warps=4, num_stages=2),
        "h64k32w8s3": dict(block_h=64, block_k=32, num_warps=8, num_stages=3),
        "h128k32w8s2vs2": dict(block_h=128, block_k=32, num_warps=8, num_stages=2, v_splits=2),
        "h64k64w4s2": dict(block_h=64, block_k=64, num_warps=4, num_stages=2),
    }
    r = decode_case(64, 128, 4096, bw, peak, scale, configs=wide)
    show(r)
    w = best(r)
    if w:
        _mla_gpu.CFG_WIDE = {k: v for k, v in wide[w].items()}
    narrow = {
        "k64w4s3": dict(block_h=16, block_k=64, num_warps=4, num_stages=3),
        "k64w4s4": dict(block_h=16, block_k=64, num_warps=4, num_stages=4),
        "k32w4s3": dict(block_h=16, block_k=32, num_warps=4, num_stages=3),
        "k128w8s3": dict(block_h=16, block_k=128, num_warps=8, num_stages=3),
    }
    r = decode_case(128, 16, 8192, bw, peak, scale, configs=narrow, do_xla=False)
    show(r)
    n = best(r)
    if n:
        _mla_gpu.CFG_NARROW = {k: v for k, v in narrow[n].items() if k != "block_h"}
    # split heuristic: waves of programs to aim for when batch x row blocks is small
    totals = {}
    for waves in (1, 2, 4):
        _mla_gpu.SPLIT_WAVES = waves
        tot = 0.0
        for heads, batch, length in ((128, 1, 8192), (16, 1, 32768), (128, 8, 4096), (16, 8, 8192)):
            r = decode_case(batch, heads, length, bw, peak, scale, do_xla=False, do_check=False)
            t = r["times_us"]["ours"]
            log(f"   waves {waves}: h{heads} b{batch} L{length}: {t:8.1f} µs (floor {r['floor_us']:.1f})")
            tot += t / r["floor_us"]
        totals[waves] = tot
    _mla_gpu.SPLIT_WAVES = min(totals, key=totals.get)
    log(
        f"TUNED decode: CFG_WIDE={_mla_gpu.CFG_WIDE} CFG_NARROW={_mla_gpu.CFG_NARROW} "
        f"SPLIT_WAVES={_mla_gpu.SPLIT_WAVES}"
    )

    q, k, v, do = prefill_inputs(2, 4096, 128)
    flops = 2 * 2 * 128 * 4096**2 * 320 / 2
    fwd_res = {}
    for fc in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3)]:
        try:
            fwd, _ = prefill_fns("pallas_gpu", scale, (fc,) + _flash_prefill.DEFAULT_CONFIG[1:])
            fwd_res[fc] = time_fn(fwd, (q, k, v), 1, reps=3)
            log(f"prefill fwd {fc}: {fwd_res[fc] * 1e6:9.1f} µs {flops / fwd_res[fc] / 1e12:5.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            log(f"prefill fwd {fc} failed: {type(e).__name__}: {str(e)[:300]}")
    fbest = min(fwd_res, key=fwd_res.get) if fwd_res else _flash_prefill.DEFAULT_CONFIG[0]
    bwd_res = {}
    for bc in [((32, 64, 4, 2), (64, 32, 4, 2)), ((32, 64, 4, 3), (64, 32, 4, 3)), ((32, 128, 8, 2), (64, 64, 4, 2))]:
        try:
            _, fb = prefill_fns("pallas_gpu", scale, (fbest,) + bc)
            bwd_res[bc] = time_fn(fb, (q, k, v, do), 1, reps=3)
            log(f"prefill fwd+bwd {bc}: {bwd_res[bc] * 1e6:9.1f} µs {3.5 * flops / bwd_res[bc] / 1e12:5.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            log(f"prefill bwd {bc} failed: {type(e).__name__}: {str(e)[:300]}")
    bbest = min(bwd_res, key=bwd_res.get) if bwd_res else _flash_prefill.DEFAULT_CONFIG[1:]
    _flash_prefill.DEFAULT_CONFIG = (fbest,) + tuple(bbest)
    log(f"TUNED prefill: DEFAULT_CONFIG={_flash_prefill.DEFAULT_CONFIG}")


def split_sweep(bw, peak, scale):
    """Explicit split counts against the heuristic's choice on the split-KV (small batch) shapes."""
    for heads, batch, length in ((128, 1, 4096), (128, 8, 4096), (16, 1, 32768)):
        auto = _mla_gpu.default_config(heads, batch, length, False)["num_splits"]
        cells = []
        for n in sorted({max(1, auto // 2), auto, auto * 2}):
            r = decode_case(batch, heads, length, bw, peak, scale, do_xla=False, do_check=False, num_splits=n)
            cells.append(f"{n}{'*' if n == auto else ''}: {r['times_us']['ours']:.1f}")
        log(f"splits h{heads} b{batch} L{length} (µs; * = auto): " + ", ".join(cells))


def small_batch_sweep(bw, peak, scale):
    """Splits x tiles on the shapes where one batch row's work must be spread over the chip (the rows
    where the default loses to XLA), timed with XLA in the same process; the winners are printed."""
    narrow = dict(num_warps=4)
    cases = {
        (16, 1, 32768): {
            f"s{n}k{k}st{st}": dict(narrow, block_h=16, block_k=k, num_stages=st, num_splits=n)
            for n in (64, 128, 256)
            for k, st in ((32, 3), (32, 4), (64, 2))
        },
        (16, 8, 4096): {
            f"s{n}k{k}st{st}": dict(narrow, block_h=16, block_k=k, num_stages=st, num_splits=n)
            for n in (4, 8, 16, 32)
            for k, st in ((32, 3), (64, 2))
        },
        (128, 1, 4096): {f"s{n}": dict(_mla_gpu.CFG_WIDE, num_splits=n) for n in (4, 8, 16, 32, 64)},
    }
    for (heads, batch, length), configs in cases.items():
        r = decode_case(batch, heads, length, bw, peak, scale, configs=configs, do_check=False)
        times = r["times_us"]
        auto = _mla_gpu.default_config(heads, batch, length, False)
        cells = ", ".join(f"{k}: {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
        log(
            f"small-batch sweep h{heads} b{batch} L{length} (µs; default splits {auto['num_splits']}, "
            f"floor {r['floor_us']:.1f}): {cells}"
        )


def decode_shapes(args) -> list[tuple]:
    """(heads, batch, cache length, paged) rows of the decode table."""
    # default: one shape per regime, both head counts, batch 1..128, caches 1K..32K (~4 min
    # with the prefill pair below); --more: 17 + 2 shapes (~9 min); --all: the full grid
    shapes = [
        (128, 1, 4096, False),
        (16, 1, 32768, False),
        (128, 8, 32768, False),
        (16, 8, 4096, False),
        (128, 64, 1024, False),
        (16, 128, 8192, False),
        (128, 128, 8192, False),
        (128, 64, 4096, True),
    ]
    if args.more:
        shapes = [
            (128, 1, 4096),
            (128, 1, 32768),
            (128, 8, 4096),
            (128, 8, 32768),
            (128, 64, 1024),
            (128, 64, 4096),
            (128, 64, 8192),
            (128, 128, 4096),
            (128, 128, 8192),
            (128, 128, 32768),
            (16, 1, 4096),
            (16, 1, 32768),
            (16, 8, 8192),
            (16, 64, 8192),
            (16, 128, 1024),
            (16, 128, 8192),
            (16, 128, 32768),
        ]
        shapes = [s + (False,) for s in shapes] + [(128, 64, 4096, True), (16, 128, 8192, True)]
    if args.all:
        shapes = [(h, b, L, False) for h in (128, 16) for b in (1, 8, 64, 128) for L in (1024, 4096, 8192, 32768)]
        shapes += [(128, 64, 4096, True), (16, 128, 8192, True)]
    if args.quick:
        shapes = [(128, 1, 4096, False), (128, 64, 4096, False), (16, 128, 8192, False)]
    if args.shape:
        shapes = [
            (int(h), int(b), int(L), paged == "paged")
            for h, b, L, paged in (tuple(x.split(",")) + ("",) * (4 - len(x.split(","))) for x in args.shape)
        ]
    return shapes


def prefill_shapes(args) -> list[tuple]:
    """(heads, batch, tokens) rows of the prefill tables."""
    pshapes = [(128, 1, 4096), (16, 8, 2048)]
    if args.more:
        pshapes = [(128, 1, 1024), (128, 1, 8192), (128, 4, 2048), (128, 8, 4096), (16, 1, 8192), (16, 8, 4096)]
    if args.all:
        pshapes = [
            (h, b, t) for h in (128, 16) for b, t in ((1, 1024), (1, 4096), (1, 8192), (4, 2048), (8, 1024), (8, 4096))
        ]
    if args.quick:
        pshapes = [(16, 8, 2048)]
    return pshapes


def dump(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all checks passed, 1 a kernel result mismatched its reference, 2 no GPU."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three decode shapes and one prefill shape")
    ap.add_argument("--more", action="store_true", help="19 decode and 6 prefill shapes (~9 min on an H100)")
    ap.add_argument("--tune", action="store_true", help="sweep tile configs instead of the tables")
    ap.add_argument("--all", action="store_true", help="every combination of the decode/prefill grids")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--verbose", action="store_true", help="log compile times")
    ap.add_argument("--split-sweep", action="store_true", help="time a few explicit split counts first")
    ap.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="HEADS,BATCH,LEN[,paged]",
        help="decode shapes to time instead of the default set (repeatable)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        default=None,
        metavar="IMPL",
        help="decode kernels to time side by side (mla_decode implementations, e.g. pallas_gpu mosaic_gpu)",
    )
    ap.add_argument(
        "--tune-mgpu",
        action="store_true",
        help="time the Mosaic GPU kernel at a few split counts on each decode shape first (reported only)",
    )
    ap.add_argument(
        "--small-batch-sweep",
        action="store_true",
        help="time split counts x tiles on the small-batch shapes first (reported only)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: stop starting new shapes after this (the tables print what ran)",
    )
    args = ap.parse_args(argv)
    global VERBOSE, OURS
    VERBOSE = args.verbose
    FAILURES.clear()
    ERRORS.clear()
    if args.impls:
        bad = [i for i in args.impls if i not in mla.IMPLEMENTATIONS]
        if bad:
            ap.error(f"unknown implementation(s) {bad}; expected some of {mla.IMPLEMENTATIONS}")
        OURS = args.impls[0]
        EXTRA_IMPLS[:] = args.impls[1:]
    t_start = time.perf_counter()

    def out_of_time(frac=1.0):
        return args.budget is not None and time.perf_counter() - t_start > frac * args.budget

    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind} ({getattr(dev, 'core_count', '?')} SMs)")
    if dev.platform != "gpu":
        log("needs a GPU")
        return 2
    scale = 1.0 / math.sqrt(192)
    bw, peak = ceilings()
    log(f"measured: read {bw / 1e9:.0f} GB/s, dense bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    report = dict(read_gbs=bw / 1e9, matmul_tflops=peak / 1e12, decode=[], prefill=[])

    if args.tune:
        tune(bw, peak, scale)  # then the tables, with the winners
    if args.split_sweep:
        split_sweep(bw, peak, scale)
    if args.small_batch_sweep:
        small_batch_sweep(bw, peak, scale)
    if args.tune_mgpu:
        tune_mgpu(bw, peak, scale, decode_shapes(args))
    if not args.no_decode:
        # correctness of the auto path on ragged / paged / multi-token inputs (bf16, realistic dims)
        decode_extra_checks(scale)
        for heads, batch, length, paged in decode_shapes(args):
            if out_of_time(0.65 if not args.no_prefill else 1.0):
                log(f"budget: skipping decode h{heads} b{batch} L{length} and later shapes")
                break
            r = decode_case(batch, heads, length, bw, peak, scale, paged=paged)
            report["decode"].append(r)
            log(fmt_decode_multi(r, peak) if EXTRA_IMPLS else fmt_decode_row(r))
            dump(args.json, report)
    if not args.no_prefill:
        prefill_check(scale)
        impls = {
            "ours": ("pallas_gpu", None),
            "cudnn": ("cudnn_native", None),
            "cudnn_pad": ("cudnn_pad", None),
            "xla": ("xla", None),
        }
        for heads, batch, t in prefill_shapes(args):
            if out_of_time():
                log(f"budget: skipping prefill h{heads} b{batch} t{t} and later shapes")
                break
            r = prefill_case(batch, t, heads, scale, impls, peak)
            report["prefill"].append(r)
            dump(args.json, report)
            log(f"prefill h{heads} b{batch} t{t}: fwd {r['fwd']} fwd+bwd {r['fwdbwd']}")

    log(f"\nmeasured in this run: read {bw / 1e9:.0f} GB/s, dense bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    if report["decode"]:
        log("\nDecode (s_q = 1, bf16, full caches)\n" + DECODE_HEADER)
        for r in report["decode"]:
            log(fmt_decode_row(r))
        if EXTRA_IMPLS:
            log(f"\nDecode kernels side by side (/ dense: of the measured {peak / 1e12:.0f} TFLOP/s)")
            log(decode_multi_header())
            for r in report["decode"]:
                log(fmt_decode_multi(r, peak))
    if report["prefill"]:
        for key, title in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
            log(f"\nPrefill {title} (causal, bf16)\n" + PREFILL_HEADER)
            for r in report["prefill"]:
                log(fmt_prefill_row(r, key))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if ERRORS:
        log("\nKERNEL ERRORS (failed to lower / compile / run):\n" + "\n".join(ERRORS))
    if FAILURES:
        log("\nFAILED CHECKS:\n" + "\n".join(FAILURES))
        return 1
    if ERRORS:
        return 3
    log("\nall checks passed")
    return 0


def decode_extra_checks(scale):
    rng = np.random.default_rng(0)
    for heads, s_q, paged, lengths in (
        (128, 1, False, [0, 1, 63, 65, 4000, 4096]),
        (16, 2, True, [2, 64, 1000, 4096]),
        (128, 2, True, [5, 4096, 129, 3000]),
        (16, 1, False, [4096, 17, 0, 2048]),
    ):
        batch = len(lengths)
        q = jnp.asarray(rng.standard_normal((batch, s_q, heads, D)), jnp.bfloat16)
        if paged:
            nb = batch * 64 + 7
            cache = jnp.asarray(rng.standard_normal((nb, 64, D)), jnp.bfloat16)
            bt = jnp.asarray(rng.permutation(nb)[: batch * 64].reshape(batch, 64), jnp.int32)
        else:
            cache = jnp.asarray(rng.standard_normal((batch, 4096, D)), jnp.bfloat16)
            bt = None
        ln = jnp.asarray(lengths, jnp.int32)
        ref = mla.mla_decode_reference(q, cache, ln, softmax_scale=scale, block_table=bt)
        for impl in [OURS] + [i for i in EXTRA_IMPLS if i != OURS]:
            if not decode_supported(impl, heads, s_q):
                continue
            for splits in (None, 7):
                name = f"decode ragged {impl} h{heads} s_q{s_q} paged={paged} splits={splits}"
                try:
                    out = mla.mla_decode(
                        q, cache, ln, softmax_scale=scale, block_table=bt, num_splits=splits, implementation=impl
                    )
                    check(name, rel_err(out, ref), 2e-2)
                except Exception as e:  # noqa: BLE001
                    if impl == OURS:
                        FAILURES.append(f"{name} failed: {one_line(e)}")
                        log(FAILURES[-1])
                        traceback.print_exc()
                    else:  # one line, and the other kernels go on
                        ERRORS.append(f"{name}: {one_line(e)}")
                        log(f"  FAILED {ERRORS[-1]}")
                        if VERBOSE:
                            traceback.print_exc()
    log("decode ragged/paged/multi-token checks done")


if __name__ == "__main__":
    sys.exit(main())
