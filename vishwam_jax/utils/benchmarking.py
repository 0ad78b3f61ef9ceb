"""Timing helpers for the benchmark scripts: accelerator ceilings measured in the same run."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


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


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes/s of an elementwise pass over `num_bytes` of bf16 (counting bytes read and written)."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    fn = jax.jit(lambda a: a * 2)
    seconds = time_fn(fn, x, iters=20)
    return 2 * num_bytes / seconds


def matmul_flops(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """FLOP/s of a dense n×n×n matmul."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    fn = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(fn, a, b, iters=10)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
