"""Repeated layers stored stacked on a leading `layers` axis and run under `jax.lax.scan`.

A stack is one module built by `nnx.vmap` over split RNG keys, so every parameter gains the leading
axis (and the logical name "layers" in front of its own names). Running it splits the stack once,
and the scan body merges one slice back into a layer module: the trace, and so the compile time,
covers one layer whatever the depth. Caches are stacked the same way and go through the scan as
inputs and outputs, so a layer reads and writes only its own slice.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from vishwam_jax.models.remat import remat

M = TypeVar("M", bound=nnx.Module)

# body(layer, carry, cache) -> (carry, new_cache, per-layer output or None)
LayerBody = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


def stacked(count: int, make: Callable[[nnx.Rngs], M], rngs: nnx.Rngs) -> M:
    """`count` modules made by `make(rngs)`, their parameters stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs: nnx.Rngs) -> M:
        return make(rngs)

    return build(rngs)


def scan(
    stack: nnx.Module, carry: Any, caches: Any, body: LayerBody, *, remat_policy: str = "none", unroll: int = 1
) -> tuple[Any, Any, Any]:
    """Run `body` over the layers of `stack` in order; returns (carry, stacked new caches, stacked
    per-layer outputs). `caches` has the stack's leading axis on every leaf (or is None).

    unroll: layers per loop iteration (`config.scan_unroll`); at least the depth emits straight-line
    code, which XLA may fuse across layer boundaries (the compile then grows with depth).
    """
    graphdef, state = nnx.split(stack)
    depth = jax.tree_util.tree_leaves(state)[0].shape[0]
    if unroll >= depth:
        return _unrolled(graphdef, state, depth, carry, caches, body, remat_policy)

    def step(carry, xs):
        layer_state, cache = xs
        carry, cache, out = body(nnx.merge(graphdef, layer_state), carry, cache)
        return carry, (cache, out)

    step = remat(step, remat_policy, prevent_cse=False)
    carry, (caches, outs) = jax.lax.scan(step, carry, (state, caches), unroll=unroll)
    return carry, caches, outs


def _unrolled(graphdef, state, depth: int, carry: Any, caches: Any, body: LayerBody, remat_policy: str):
    """Straight-line layers (no loop at all, so XLA fuses across layer boundaries as in a Python loop)."""
    block = remat(lambda state, carry, cache: body(nnx.merge(graphdef, state), carry, cache), remat_policy)
    new_caches, outs = [], []
    for i in range(depth):
        pick = lambda a: a[i]  # noqa: E731
        carry, cache, out = block(jax.tree_util.tree_map(pick, state), carry, jax.tree_util.tree_map(pick, caches))
        new_caches.append(cache)
        outs.append(out)
    stack_all = lambda *xs: jnp.stack(xs)  # noqa: E731
    return carry, jax.tree_util.tree_map(stack_all, *new_caches), jax.tree_util.tree_map(stack_all, *outs)


def run(module: nnx.Module, carry: Any, cache: Any, body: LayerBody, *, remat_policy: str = "none") -> tuple[Any, Any, Any]:
    """`body` on one unstacked block, under the same remat policy as a scanned one."""
    graphdef, state = nnx.split(module)
    block = remat(lambda state, carry, cache: body(nnx.merge(graphdef, state), carry, cache), remat_policy)
    return block(state, carry, cache)


def layer(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stack as a module of its own (e.g. one MTP depth)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[index], state))
