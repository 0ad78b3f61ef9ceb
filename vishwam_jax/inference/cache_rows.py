"""Reading and writing a subset of batch rows (serving slots) of any family's cache pytree.

A serving engine keeps one cache of `num_slots` rows for the whole life of the server and runs each
compiled step on some of those rows. Families lay their caches out differently (Gemma stacks
[periods, batch, ...], DeepSeek's paged pools have no batch axis at all), so the batch axis of each
leaf is found once by shape inference: the axis whose size follows the batch size when the same
cache is built for batch 1 and batch 2. A leaf with no such axis (a page pool shared by every row)
is passed through whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

SHARED = -1  # batch axis of a leaf that every row shares (a page pool)


def batch_axes(make_cache: Callable[[int], Any]) -> Any:
    """The batch axis of every leaf of `make_cache(batch)` (SHARED where there is none), as a
    pytree of ints of the same structure. `make_cache` is only traced (jax.eval_shape)."""
    one, two = jax.eval_shape(lambda: make_cache(1)), jax.eval_shape(lambda: make_cache(2))

    def axis(a, b) -> int:
        moved = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if not moved:
            return SHARED
        if len(moved) != 1 or (a.shape[moved[0]], b.shape[moved[0]]) != (1, 2):
            raise ValueError(f"cannot tell the batch axis of a cache leaf: {a.shape} (batch 1) vs {b.shape} (batch 2)")
        return moved[0]

    return jax.tree_util.tree_map(axis, one, two)


def take_rows(cache: Any, axes: Any, rows: Int[Array, " n"]) -> Any:
    """Rows `rows` of every batched leaf (indices past the end read the last row)."""
    return jax.tree_util.tree_map(
        lambda x, a: x if a == SHARED else jnp.take(x, rows, axis=a, mode="clip"), cache, axes
    )


def put_rows(cache: Any, axes: Any, rows: Int[Array, " n"], values: Any) -> Any:
    """`cache` with `values` written at `rows` of every batched leaf; rows past the end are dropped
    (padding rows of a step), and shared leaves are taken from `values` whole."""

    def put(x, a, v):
        if a == SHARED:
            return v
        index = (slice(None),) * a + (rows,)
        return x.at[index].set(v.astype(x.dtype), mode="drop")

    return jax.tree_util.tree_map(put, cache, axes, values)


def prefix_rows(cache: Any, axes: Any, n: int) -> Any:
    """The first `n` rows of every batched leaf (static n: a batch bucket)."""
    return jax.tree_util.tree_map(
        lambda x, a: x if a == SHARED or x.shape[a] == n else jax.lax.slice_in_dim(x, 0, n, axis=a), cache, axes
    )


def put_prefix_rows(cache: Any, axes: Any, values: Any) -> Any:
    """`cache` with its first rows replaced by `values` (from `prefix_rows`)."""

    def put(x, a, v):
        if a == SHARED or x.shape[a] == v.shape[a]:
            return v
        return jax.lax.dynamic_update_slice_in_dim(x, v.astype(x.dtype), 0, axis=a)

    return jax.tree_util.tree_map(put, cache, axes, values)


def select_rows(mask: Bool[Array, " n"], new: Any, old: Any, axes: Any) -> Any:
    """Per row: `new` where mask, else `old` (shared leaves from `old`)."""

    def pick(a, x, y):
        if a == SHARED:
            return y
        shape = [1] * y.ndim
        shape[a] = mask.shape[0]
        return jnp.where(mask.reshape(shape), x.astype(y.dtype), y)

    return jax.tree_util.tree_map(pick, axes, new, old)
