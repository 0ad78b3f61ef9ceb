"""The active mesh: `use_mesh(mesh, rules)` turns activation constraints and expert parallelism on.

Model code calls `constrain(x, ("batch", "length", "embed"))` at a few places (embedding, attention
projections, MLP hidden); with no active mesh it returns `x` untouched, so single-device code traces
exactly as before. models/moe.py asks `current()` whether to dispatch experts over the expert axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from vishwam_jax.sharding.mesh import auto_axes
from vishwam_jax.sharding.rules import LogicalAxes, Rules, resolve_rules, spec_for

MOE_ALL_TO_ALL = ("auto", "ragged", "dense")


@dataclass(frozen=True)
class ActiveMesh:
    mesh: Mesh
    rules: Rules
    # How expert parallelism exchanges tokens: "ragged" (jax.lax.ragged_all_to_all: only the routed
    # rows travel; GPU/TPU), "dense" (jax.lax.all_to_all of worst-case-sized buffers: any backend),
    # "auto" (ragged on TPU, dense elsewhere: on GPUs NCCL's dense exchange measured faster).
    moe_all_to_all: str = "auto"
    # None: capacity-free (no token is ever dropped; buffers sized for the worst case). A factor c
    # bounds each device pair's buffer to ceil(c * rows / expert) and drops the overflow.
    moe_capacity_factor: float | None = None
    # Each device's tokens are dispatched in this many independent micro-batches, so that on GPUs
    # XLA's scheduler can run one micro-batch's all-to-all while another's experts compute.
    moe_micro_batches: int = 1

    @property
    def expert_size(self) -> int:
        return int(self.mesh.shape.get("expert", 1))


_ACTIVE: contextvars.ContextVar[ActiveMesh | None] = contextvars.ContextVar("vishwam_active_mesh", default=None)


def _jax_mesh_context(mesh: Mesh):
    # Entering jax's own mesh context puts the mesh into jit's cache key, so a function traced
    # outside use_mesh (no constraints, local MoE) is retraced inside it instead of being reused.
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh  # older jax: Mesh is itself the context manager


@contextlib.contextmanager
def use_mesh(
    mesh: Mesh,
    rules: Rules | str | None = None,
    *,
    moe_all_to_all: str = "auto",
    moe_capacity_factor: float | None = None,
    moe_micro_batches: int = 1,
) -> Iterator[ActiveMesh]:
    """Within this block, traced model code shards its activations by `rules` on `mesh` and MoE
    layers run expert-parallel when the mesh's expert axis is larger than 1.

    Trace (or call jitted functions) inside the block. jit caches are keyed on the mesh but not on
    the rules: to switch rule sets under one mesh, use a fresh jitted function.
    """
    if moe_all_to_all not in MOE_ALL_TO_ALL:
        raise ValueError(f"moe_all_to_all must be one of {MOE_ALL_TO_ALL}; got {moe_all_to_all!r}")
    if moe_capacity_factor is not None and moe_capacity_factor <= 0:
        raise ValueError(f"moe_capacity_factor must be positive (or None for capacity-free); got {moe_capacity_factor}")
    if not (isinstance(moe_micro_batches, int) and moe_micro_batches >= 1):
        raise ValueError(f"moe_micro_batches must be a positive integer; got {moe_micro_batches!r}")
    mesh = auto_axes(mesh)  # the mesh param_shardings placed the parameters on, for any mesh jax.make_mesh gives
    active = ActiveMesh(mesh, resolve_rules(rules, mesh), moe_all_to_all, moe_capacity_factor, moe_micro_batches)
    token = _ACTIVE.set(active)
    try:
        with _jax_mesh_context(mesh):
            yield active
    finally:
        _ACTIVE.reset(token)


def current() -> ActiveMesh | None:
    """The mesh and rules of the innermost `use_mesh`, or None."""
    return _ACTIVE.get()


def inside_manual_region() -> bool:
    # Inside shard_map the arrays are per-device blocks: a global sharding constraint is meaningless.
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    return bool(get is not None and getattr(get(), "manual_axes", ()))


def constrain(x: Array, names: LogicalAxes) -> Array:
    """Pin `x`'s sharding to the active rules' placement of its logical dimensions `names`.

    A no-op without an active mesh. A dimension the mesh does not divide (a batch of 1 while
    decoding, say) keeps only the mesh axes that do divide it.
    """
    active = _ACTIVE.get()
    if active is None or inside_manual_region():
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {names} do not match an array of shape {x.shape}")
    spec = spec_for(tuple(names), tuple(x.shape), active.mesh, active.rules.activations, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def shard_map(f: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`jax.shard_map` (jax >= 0.7) or `jax.experimental.shard_map.shard_map` (older), without the
    replication check (our bodies end in explicit collectives)."""
    if hasattr(jax, "shard_map"):
        params = inspect.signature(jax.shard_map).parameters
        check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def per_device(
    fn: Callable, args: Sequence[Array], names: Sequence[LogicalAxes | None], out_names: LogicalAxes
) -> Array:
    """`fn(*args)` run on each device's block of its arguments, laid out as `constrain` lays out
    `names` (None: replicated), its output assembled by `out_names`. For kernels XLA cannot
    partition (a Pallas call): left to GSPMD, their sharded operands would be gathered onto every
    device on each call. Without an active mesh, or inside shard_map, just `fn(*args)`.

    fn must treat the dimensions named alike independently (a batch row, a head), so the blocks'
    results are the global result's blocks.
    """
    active = _ACTIVE.get()
    if active is None or inside_manual_region():
        return fn(*args)
    mesh, table = active.mesh, active.rules.activations

    def spec(n, shape):
        return PartitionSpec() if n is None else spec_for(tuple(n), tuple(shape), mesh, table, strict=False)

    out_shape = jax.eval_shape(fn, *args).shape
    in_specs = tuple(spec(n, a.shape) for a, n in zip(args, names))
    return shard_map(fn, mesh, in_specs, spec(out_names, out_shape))(*args)
