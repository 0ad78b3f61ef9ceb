"""Repeated layers stored stacked on a leading `layers` axis and run under `jax.lax.scan`.

A stack is one module built by `nnx.vmap` over split RNG keys, so every parameter gains the leading
axis (and the logical name "layers" in front of its own names). Running it splits the stack once,
and the scan body merges one slice back into a layer module: the trace, and so the compile time,
covers one layer whatever the depth. Caches are stacked the same way and go through the scan as
inputs and outputs, so a layer reads and writes only its own slice.

Serving on GPUs takes one more step. Inside a loop, XLA's GPU backend copies each layer's slice of
a stacked weight out of the stack before the matmul (or Pallas kernel) that reads it: a decode step,
which should read every weight once, then reads and writes it again (measured 2.4-9x slower on an
H200). `unstack_layers` therefore turns each stacked weight into `Layers`, one buffer per layer, and
`scan` runs such a stack as straight-line code over those buffers, as a per-layer model would. The
parameter tree, its logical axes and the checkpoint layout are the same either way; `restack_layers`
goes back (training and saving use the stacked form).

Caches held in page pools (inference/paged_cache.py) are not scan inputs: `scan_paged` carries a
stack's pools through the loop as one merged pool, written in place (see `merge_layer_pools`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from vishwam_jax.inference import paged_cache
from vishwam_jax.models.remat import remat

M = TypeVar("M", bound=nnx.Module)

# body(layer, carry, cache) -> (carry, new_cache, per-layer output or None)
LayerBody = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


@jax.tree_util.register_pytree_node_class
class Layers:
    """A stacked parameter held as one buffer per layer (see the module docstring)."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.arrays), *self.arrays[0].shape)

    @property
    def dtype(self):
        return self.arrays[0].dtype

    def tree_flatten(self):
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, _, arrays):
        return cls(arrays)


def _is_layers(x) -> bool:
    return isinstance(x, Layers)


def _depth(state) -> int:  # of a stacked state or cache
    first = jax.tree_util.tree_leaves(state, is_leaf=_is_layers)[0]
    return len(first) if isinstance(first, Layers) else first.shape[0]


def _pick(state, i: int):
    """Layer i of a stacked state: a buffer of `Layers`, or a slice of a stacked array."""
    return jax.tree_util.tree_map(lambda a: a.arrays[i] if isinstance(a, Layers) else a[i], state, is_leaf=_is_layers)


def _is_stacked(variable) -> bool:
    axes = variable.get_metadata().get("out_sharding") or ()
    return bool(axes) and axes[0] == "layers"


def unstack_layers(params: nnx.State, *, delete_stacked: bool = False) -> nnx.State:
    """Every stacked parameter (logical axis "layers" first) as `Layers`: one buffer per layer.

    One jitted split per parameter. delete_stacked: free each stacked buffer as soon as it is split
    (the caller owns `params` and will not read them again), so the peak memory is the model plus its
    largest stacked parameter, not two models (XLA cannot reuse a donated stack for its smaller
    slices). Shardings carry over (the layers axis itself is never sharded).
    """

    def split(variable):
        if not _is_stacked(variable) or isinstance(variable.get_value(), Layers):
            return variable
        array = variable.get_value()
        out_shardings = None
        if isinstance(getattr(array, "sharding", None), jax.sharding.NamedSharding):
            spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
            out_shardings = jax.sharding.NamedSharding(array.sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        slices = jax.jit(
            lambda a: tuple(a[i] for i in range(a.shape[0])),
            out_shardings=None if out_shardings is None else (out_shardings,) * array.shape[0],
        )(array)
        if delete_stacked:
            jax.block_until_ready(slices)
            array.delete()
        return variable.replace(Layers(slices))

    return jax.tree_util.tree_map(split, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def restack_layers(params: nnx.State) -> nnx.State:
    """The inverse of `unstack_layers`: every `Layers` value stacked back into one array."""

    def join(variable):
        value = variable.get_value()
        return variable.replace(jnp.stack(value.arrays)) if isinstance(value, Layers) else variable

    return jax.tree_util.tree_map(join, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
    depth = _depth(state)
    per_layer = any(_is_layers(x) for x in jax.tree_util.tree_leaves(state, is_leaf=_is_layers))
    if per_layer or unroll >= depth:
        return _unrolled(graphdef, state, depth, carry, caches, body, remat_policy, per_layer)

    def step(carry, xs):
        layer_state, cache = xs
        carry, cache, out = body(nnx.merge(graphdef, layer_state), carry, cache)
        return carry, (cache, out)

    step = remat(step, remat_policy, prevent_cse=False)
    carry, (caches, outs) = jax.lax.scan(step, carry, (state, caches), unroll=unroll)
    return carry, caches, outs


# Which parts of a stack's cache are page pools: True / False for the whole cache, or a list that
# matches a list of per-layer caches (a Gemma period: its global layers page, its sliding ones keep rings).
PagedMask = bool | list


def _partition(caches: Any, paged: PagedMask) -> tuple[Any, Any]:
    """(the scanned caches, the pools), each with None where the other part is."""
    if isinstance(paged, bool):
        return (None, caches) if paged else (caches, None)
    parts = [_partition(c, p) for c, p in zip(caches, paged, strict=True)]
    return [c for c, _ in parts], [p for _, p in parts]


def _combine(caches: Any, pools: Any, paged: PagedMask) -> Any:
    """The inverse of `_partition`."""
    if isinstance(paged, bool):
        return pools if paged else caches
    return [_combine(c, p, m) for c, p, m in zip(caches, pools, paged, strict=True)]


def scan_paged(
    stack: nnx.Module,
    carry: Any,
    caches: Any,
    body: LayerBody,
    *,
    block_table: jax.Array | None,
    paged: PagedMask,
    remat_policy: str = "none",
    unroll: int = 1,
) -> tuple[Any, Any, Any]:
    """`scan` over a stack whose caches are (partly) page pools: the parts marked by `paged` hold
    pools [layers, num_blocks, page, ...] read through `block_table` (one for every layer). They are
    carried through the loop merged into one pool (paged_cache.merge_layer_pools), and `body` sees
    each layer's pools with its offset table beside them, so the layers' code reads one layer cache
    whatever its layout. Without a block table (a contiguous cache, or none): `scan` itself."""
    if block_table is None:
        return scan(stack, carry, caches, body, remat_policy=remat_policy, unroll=unroll)
    scanned, pools = _partition(caches, paged)
    depth, num_blocks = jax.tree_util.tree_leaves(pools)[0].shape[:2]

    def step(layer, carry, layer_caches):
        carry, i, merged = carry
        table = paged_cache.layer_block_table(block_table, i, num_blocks, depth)
        pages = paged_cache.with_block_table(merged, table)
        carry, layer_caches, out = body(layer, carry, _combine(layer_caches, pages, paged))
        layer_caches, pages = _partition(layer_caches, paged)
        return (carry, i + 1, paged_cache.without_block_table(pages)), layer_caches, out

    merged = paged_cache.merge_layer_pools(pools)
    (carry, _, merged), scanned, outs = scan(
        stack, (carry, jnp.int32(0), merged), scanned, step, remat_policy=remat_policy, unroll=unroll
    )
    return carry, _combine(scanned, paged_cache.split_layer_pools(merged, depth), paged), outs


def _unrolled(
    graphdef, state, depth: int, carry: Any, caches: Any, body: LayerBody, remat_policy: str, per_layer: bool
):
    """Straight-line layers (no loop at all, so XLA fuses across layer boundaries as in a Python loop).

    per_layer (the weights are `Layers`): the new caches come back as `Layers` too, so that a decode
    loop carries one buffer per layer and each step writes only its new tokens, never re-stacking
    (copying) the whole cache; a stacked cache handed in (a fresh one, at prefill) is split once."""
    block = remat(lambda state, carry, cache: body(nnx.merge(graphdef, state), carry, cache), remat_policy)
    new_caches, outs = [], []
    for i in range(depth):
        carry, cache, out = block(_pick(state, i), carry, _pick(caches, i))
        new_caches.append(cache)
        outs.append(out)
    stack_all = lambda *xs: jnp.stack(xs)  # noqa: E731
    join = (lambda *xs: Layers(xs)) if per_layer else stack_all
    return carry, jax.tree_util.tree_map(join, *new_caches), jax.tree_util.tree_map(stack_all, *outs)


def run(
    module: nnx.Module, carry: Any, cache: Any, body: LayerBody, *, remat_policy: str = "none"
) -> tuple[Any, Any, Any]:
    """`body` on one unstacked block, under the same remat policy as a scanned one."""
    graphdef, state = nnx.split(module)
    block = remat(lambda state, carry, cache: body(nnx.merge(graphdef, state), carry, cache), remat_policy)
    return block(state, carry, cache)


def layer(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stack as a module of its own (e.g. one MTP depth)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, _pick(state, index))
