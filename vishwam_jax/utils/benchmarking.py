"""Timing helpers for the benchmark scripts: accelerator ceilings measured in the same run.

Memory-bound work is compared with the *read* bandwidth (`read_bandwidth`), compute-bound work with the
dense bf16 matmul (`matmul_flops`). A fraction of either above 100 % means the ceiling is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time (seconds) of `fn(*args)` after warm-up, waiting for the device each time."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# Datasheet HBM bandwidth (bytes/s) by device kind, shown beside the measured ceiling: a measured read
# bandwidth far below it means the measurement, not the hardware, is the limit.
SPEC_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5e": 0.819e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "TPU v6e": 1.64e12,
}


def spec_bandwidth(device_kind: str) -> float | None:
    """The datasheet bandwidth of a device kind (the longest matching name wins), or None if unknown."""
    matches = [name for name in SPEC_BANDWIDTH if name.lower() in device_kind.lower()]
    return SPEC_BANDWIDTH[max(matches, key=len)] if matches else None


@dataclasses.dataclass(frozen=True)
class ReadBandwidth:
    """What a memory-bound step can at best stream: bytes read per second, measured in this process.

    A decode step reads its weights and writes almost nothing, so its floor is bytes / `bytes_per_s`. An
    elementwise copy is not that ceiling: it also writes, and counting both directions overstates the
    read rate on some GPUs and understates it on others.
    """

    bytes_per_s: float  # the best of the measurements below: every roofline divides by this
    xla_reduction: float
    pallas_stream: float | None  # None where Pallas has no native lowering (CPU)
    spec: float | None  # datasheet, for the tables; never a denominator

    def describe(self) -> str:
        scale, unit = (1e12, "TB/s") if self.bytes_per_s >= 1e11 else (1e9, "GB/s")  # CPUs read GB/s
        parts = [f"XLA reduction {self.xla_reduction / scale:.2f}"]
        if self.pallas_stream is not None:
            parts.append(f"Pallas stream {self.pallas_stream / scale:.2f}")
        spec = f", spec {self.spec / scale:.2f} {unit}" if self.spec else ""
        return f"read bandwidth {self.bytes_per_s / scale:.2f} {unit} (best of {', '.join(parts)}){spec}"


_STREAM_COLUMNS = 512  # bf16: 1 KiB per row, a whole number of 128-byte transactions


def _stream_kernel(x_ref, o_ref, *, rows_per_step: int, steps: int):
    # Accumulate column sums in float32 so that the compiler cannot skip a load; the few bytes written
    # per program are negligible next to the block read.
    def body(i, acc):
        block = x_ref[pl.ds(pl.multiple_of(i * rows_per_step, rows_per_step), rows_per_step), :]
        return acc + jnp.sum(block.astype(jnp.float32), axis=0)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((_STREAM_COLUMNS,), jnp.float32))
    o_ref[...] = jnp.broadcast_to(acc, o_ref.shape)


def stream_read(
    x: Float[Array, "rows 512"],
    *,
    rows_per_program: int = 1024,
    rows_per_step: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> Float[Array, "programs 8 512"]:
    """A Pallas kernel that reads every element of `x` once: per program, column sums of its rows.
    num_warps / num_stages tune the GPU (Triton) lowering and are ignored elsewhere."""
    rows, cols = x.shape
    if cols != _STREAM_COLUMNS or rows % rows_per_program or rows_per_program % rows_per_step:
        raise ValueError(f"stream_read needs [k * {rows_per_program}, {_STREAM_COLUMNS}] input, got {x.shape}")
    programs = rows // rows_per_program
    kernel = functools.partial(_stream_kernel, rows_per_step=rows_per_step, steps=rows_per_program // rows_per_step)
    params = {}
    if num_warps and not interpret and jax.default_backend() == "gpu":
        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages or 1)
    return pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[pl.BlockSpec((rows_per_program, cols), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, 8, cols), lambda i: (i, 0, 0)),  # 8 rows: TPU's minimum f32 tile
        out_shape=jax.ShapeDtypeStruct((programs, 8, cols), jnp.float32),
        interpret=interpret,
        **params,
    )(x)


def queued_seconds(fn: Callable, *args, calls: int = 10, repeats: int = 5) -> float:
    """Seconds per call of `fn(*args)` with `calls` calls queued back to back and one wait at the end
    (best of `repeats`): the device's time, without the per-call dispatch and sync a ~1 ms kernel would
    otherwise be charged with."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


# Pallas candidates (rows per program, rows per loop step, warps, pipeline stages); the best one counts.
_STREAM_CANDIDATES = ((1024, 32, 4, 3), (2048, 64, 8, 3), (4096, 64, 8, 4), (8192, 128, 8, 3), (2048, 32, 4, 4))


def read_bandwidth(num_bytes: int | None = None) -> ReadBandwidth:
    """Measure how fast this device streams `num_bytes` of bf16 it only reads (default 4 GiB on an
    accelerator, far past its caches; 64 MiB on a CPU): XLA's reductions (to a scalar and per row) and,
    on GPUs and TPUs, the Pallas streaming kernel at a few block sizes; the best is the ceiling."""
    if num_bytes is None:
        num_bytes = 64 << 20 if jax.default_backend() == "cpu" else 4 << 30
    rows = max(1, num_bytes // (2 * _STREAM_COLUMNS) // 8192) * 8192
    # Random bits, not a constant: nothing a memory system could compress. Made as uint16 and bitcast,
    # so that no float32 temporary twice the buffer's size is ever allocated.
    bits = jax.jit(lambda key: jax.random.bits(key, (rows, _STREAM_COLUMNS), jnp.uint16))(jax.random.key(0))
    x = lax.bitcast_convert_type(bits, jnp.bfloat16)
    del bits
    read = x.size * x.dtype.itemsize
    xla = max(
        read / queued_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x),
        read / queued_seconds(jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)), x),  # writes 1/256
    )
    pallas = None
    if jax.default_backend() in ("gpu", "tpu"):
        rates = []
        for rows_per_program, rows_per_step, warps, stages in _STREAM_CANDIDATES:
            fn = jax.jit(
                functools.partial(
                    stream_read,
                    rows_per_program=rows_per_program,
                    rows_per_step=rows_per_step,
                    num_warps=warps,
                    num_stages=stages,
                )
            )
            try:
                rates.append(read / queued_seconds(fn, x))
            except Exception as e:  # a block size this chip cannot lower is one fewer candidate, not a failure
                print(f"stream_read {rows_per_program}x{rows_per_step} skipped: {str(e).splitlines()[0][:200]}")
        pallas = max(rates) if rates else None
    del x
    best = max(xla, pallas or 0.0)
    return ReadBandwidth(best, xla, pallas, spec_bandwidth(jax.devices()[0].device_kind))


def matmul_flops(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """FLOP/s of a dense n×n×n matmul."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    fn = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(fn, a, b, iters=10)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
