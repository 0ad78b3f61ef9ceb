#!/usr/bin/env python
"""Paged GQA decode attention on one GPU: our Triton kernel (pallas_kernels/paged_attention.py)
against the XLA path it replaces (gather each row's pages, then attend) and JAX's own Pallas GPU
paged attention (`jax.experimental.pallas.ops.gpu.paged_attention`, given the same pages in its
[kv_heads, pages, page, head_dim] layout), in one run.

    python scripts/benchmark_paged_attention.py [--json out.json]
    python scripts/benchmark_paged_attention.py --interpret --shapes tiny   # CPU smoke run

Every row of every shape is full to its length, its pages shuffled through the pool. Each timed
executable runs the attention once on each of several copies of the pool (together past the L2
cache), so the time is the device's per call, not the dispatch's. Reported: microseconds per call,
GB/s of K/V/positions read, and that over the read bandwidth measured in the same run. Our kernel is
checked against the float32 reference first; a mismatch makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vishwam_jax.models import attention  # noqa: E402
from vishwam_jax.pallas_kernels.paged_attention import paged_decode_gpu, paged_decode_reference  # noqa: E402
from vishwam_jax.utils.benchmarking import read_bandwidth  # noqa: E402

PAGE = 64
# name: (batch, query heads, kv heads, head dim, tokens per row, softcap)
SHAPES = {
    "gemma-2b-serving": (64, 8, 1, 256, 768, 0.0),  # benchmark_serving's 64 streams, prompt 512 + 256
    "gemma-2b-long": (8, 8, 1, 256, 8192, 0.0),
    "gemma-2b-one": (1, 8, 1, 256, 8192, 0.0),
    "grok-1": (8, 48, 8, 128, 4096, 0.0),
    "gemma2-9b": (32, 16, 8, 256, 4096, 50.0),  # soft-capped scores
    "tiny": (3, 4, 2, 32, 200, 0.0),
}
MIN_BYTES = 256 << 20  # pool copies per timed call, together: far past an H100/H200's 50 MB of L2


def make_case(rng, batch, heads, kv_heads, dim, length, copies):
    """Pools (one per copy) of pages handed out in a shuffled order; every row `length` tokens long."""
    pages = -(-length // PAGE)
    blocks = batch * pages + 1
    tables, pools = [], []
    for _ in range(copies):
        table = rng.permutation(blocks)[: batch * pages].reshape(batch, pages).astype(np.int32)
        positions = np.full((blocks, PAGE), -1, np.int32)
        positions[table] = np.arange(pages * PAGE, dtype=np.int32).reshape(pages, PAGE)
        key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(2**31))))
        k = jax.random.normal(key_k, (blocks, PAGE, kv_heads, dim), jnp.bfloat16)
        v = jax.random.normal(key_v, (blocks, PAGE, kv_heads, dim), jnp.bfloat16)
        tables.append(jnp.asarray(table))
        pools.append((k, v, jnp.asarray(positions)))
    q = jnp.asarray(rng.standard_normal((batch, heads, dim), np.float32), jnp.bfloat16)
    ends = jnp.full((batch,), length, jnp.int32)
    return q, pools, tables, ends


def xla_gather(q, k, v, positions, table, ends, *, scale, softcap):
    """The model's XLA path (models/attention.py): the row's pages as a contiguous copy, then attention."""
    cache = {"k": k, "v": v, "slot_pos": positions, "block_table": table}
    keys, values, key_pos = attention.read_kv_pages(cache, ends)
    mask = attention.visible((ends - 1)[:, None], key_pos, 0)
    return attention.attend_segments(q[:, None], [(keys, values, mask)], scale=scale, softcap=softcap)[:, 0]


def jax_pallas(q, k, v, positions, table, ends, *, scale, softcap):
    """JAX's own kernel on the same pages (already moved to its layout outside the timing)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    del positions  # it masks by length only
    return paged_attention(q * jnp.asarray(scale, q.dtype), k, v, table, ends, attn_logits_soft_cap=softcap or None)


def per_call_seconds(fn, q, pools, tables, ends, repeats: int = 5) -> float:
    """One executable runs fn on every copy in turn; seconds per run of fn (best of `repeats`)."""

    @jax.jit
    def all_copies(q, pools, tables, ends):
        return [fn(q, *pool, table, ends) for pool, table in zip(pools, tables)]

    jax.block_until_ready(all_copies(q, pools, tables, ends))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(all_copies(q, pools, tables, ends))
        best = min(best, (time.perf_counter() - start) / len(pools))
    return best


def run_shape(name, rng, bandwidth, interpret):
    batch, heads, kv_heads, dim, length, softcap = SHAPES[name]
    scale = dim**-0.5
    pool_bytes = 2 * (batch * length) * kv_heads * dim * 2
    copies = 1 if interpret else max(2, -(-MIN_BYTES // pool_bytes))
    q, pools, tables, ends = make_case(rng, batch, heads, kv_heads, dim, length, copies)
    read = pool_bytes + batch * length * 4  # K, V and the positions of the slots read
    ours = lambda q, k, v, p, t, e: paged_decode_gpu(  # noqa: E731
        q, k, v, p, t, e, scale=scale, softcap=softcap, interpret=interpret
    )
    k, v, positions = pools[0]
    want = paged_decode_reference(q.astype(jnp.float32), k, v, positions, tables[0], ends, scale=scale, softcap=softcap)
    err = float(jnp.max(jnp.abs(ours(q, k, v, positions, tables[0], ends).astype(jnp.float32) - want)))
    row = {"shape": name, "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "tokens": length}
    row.update(softcap=softcap, copies=copies, bytes_read=read, max_abs_err=err, ok=err <= 2e-2)
    impls = {"ours": ours, "xla_gather": lambda *a: xla_gather(*a, scale=scale, softcap=softcap)}
    if not interpret:
        moved = [(jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0), p) for k, v, p in pools]
        impls["jax_pallas"] = (
            lambda *a: jax_pallas(*a, scale=scale, softcap=softcap),
            moved,
        )
    for impl, fn in impls.items():
        fn, impl_pools = fn if isinstance(fn, tuple) else (fn, pools)
        try:
            seconds = per_call_seconds(fn, q, impl_pools, tables, ends, repeats=1 if interpret else 5)
        except Exception as err:  # a peer that cannot take a shape is reported, not fatal
            row[impl] = {"error": str(err).splitlines()[0][:200]}
            continue
        gbps = read / seconds / 1e9
        row[impl] = {"us": 1e6 * seconds, "GB/s": gbps, "of_read_bw": gbps * 1e9 / bandwidth if bandwidth else None}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=[s for s in SHAPES if s != "tiny"], choices=list(SHAPES))
    ap.add_argument("--interpret", action="store_true", help="our kernel in Pallas' interpreter (CPU smoke run)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.interpret:
        print("no GPU: this benchmark times Triton kernels (use --interpret --shapes tiny for a smoke run)")
        return 0
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    measured = read_bandwidth()  # 64 MiB on a CPU: cheap, and the smoke run checks this path too
    print(f"measured {measured.describe()}", flush=True)
    bandwidth = None if args.interpret else measured.bytes_per_s  # the interpreter's times are no kernel's
    rng = np.random.default_rng(0)
    rows, failed = [], False
    for name in args.shapes:
        row = run_shape(name, rng, bandwidth, args.interpret)
        rows.append(row)
        failed |= not row["ok"]
        cells = []
        for impl in ("ours", "xla_gather", "jax_pallas"):
            r = row.get(impl)
            if r is None:
                continue
            if "error" in r:
                cells.append(f"{impl} failed ({r['error'][:60]})")
                continue
            share = f", {r['of_read_bw']:.2f} of read BW" if r["of_read_bw"] else ""
            cells.append(f"{impl} {r['us']:,.1f} us ({r['GB/s']:,.0f} GB/s{share})")
        check = "ok" if row["ok"] else "MISMATCH"
        print(f"{name}: check {check} (max err {row['max_abs_err']:.1e}); " + "; ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "read_bandwidth": bandwidth, "rows": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
