"""Device meshes: one 4-axis mesh for every model, and multi-host start-up.

Axes, outermost first (the order matters: `jax.make_mesh` lays the innermost axes over the closest
devices, so the chattiest axis goes last):
    data    pure data parallelism: parameters replicated, only gradients all-reduced (the one axis
            that may span TPU slices over the data-center network: multi_slice_grid)
    fsdp    data parallelism with parameters/optimizer state sharded (all-gathered per layer)
    tensor  Megatron-style tensor parallelism inside a layer (heads, MLP width, vocabulary)
    expert  expert parallelism of MoE layers (tokens exchanged by all-to-all); outside MoE layers it
            is one more data-parallel axis
Tensor and expert exchange activations every layer, so they are innermost (NVLink / ICI neighbours);
data only all-reduces gradients once per step, so it is outermost (it may cross DCN / InfiniBand).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor", "expert")


class MeshError(ValueError):
    """A mesh that cannot be built on the available devices (the message says why)."""


def _auto_axis_types(n: int):
    # Auto (GSPMD) axes: shardings are placed by the rules and propagated by XLA. Newer jax defaults
    # `jax.make_mesh` to Explicit axes (sharding in types), which the models are not written for.
    axis_type = getattr(jax.sharding, "AxisType", None)
    return None if axis_type is None else (axis_type.Auto,) * n


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with Auto axis types: the same devices in the same places under the same names.

    `jax.make_mesh` (and `Mesh(..., axis_types=Explicit)`) gives Explicit axes, whose shardings
    become part of every array's type; the models place parameters by rules and leave the rest to
    XLA's propagation, which Explicit axes refuse (ShardingTypeError on the first gather), so every
    mesh the library is handed is used through its Auto twin.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", None)
    if axis_type is None or types is None or all(t == axis_type.Auto for t in types):
        return mesh
    if not isinstance(mesh, Mesh):
        raise MeshError(
            f"a {type(mesh).__name__} with {', '.join(str(t) for t in types)} axes cannot place parameters; pass a "
            "concrete jax.sharding.Mesh (e.g. vishwam_jax.sharding.make_mesh(...))"
        )
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor", "expert") over `devices` (default: all devices of
    all hosts). One size may be -1: it takes whatever the others leave.

    The product must equal the number of devices; pass `devices=jax.devices()[:n]` to use a subset.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    sizes = _resolve_sizes(sizes, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    axis_types = _auto_axis_types(len(AXES))
    kwargs = {} if axis_types is None else {"axis_types": axis_types}
    if num_slices(devices) > 1:
        return Mesh(multi_slice_grid(sizes, devices), AXES, **kwargs)
    try:
        # Topology-aware device order (ICI torus / NVLink islands) rather than jax.devices() order.
        return jax.make_mesh(shape, AXES, devices=devices, **kwargs)
    except (ValueError, AssertionError, NotImplementedError):
        # Some device sets (e.g. an odd subset of a TPU slice) have no topology-aware assignment;
        # the given order is then the best information there is.
        import numpy as np

        return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, **kwargs)


def num_slices(devices: Sequence) -> int:
    """How many TPU slices (ICI domains joined by the data-center network) the devices span."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def multi_slice_grid(sizes: dict[str, int], devices: Sequence):
    """The device array of a mesh over several TPU slices (multi-slice / Megascale): only `data`
    crosses the data-center network (DCN), which carries one gradient all-reduce per step; every
    other axis stays inside a slice, on ICI."""
    from jax.experimental import mesh_utils

    n = num_slices(devices)
    if sizes["data"] % n:
        raise MeshError(
            f"the devices span {n} slices: data (the only axis that crosses the data-center network) must be a "
            f"multiple of {n}; got {' × '.join(f'{a}={s}' for a, s in sizes.items())}"
        )
    ici = (sizes["data"] // n,) + tuple(sizes[a] for a in AXES[1:])
    return mesh_utils.create_hybrid_device_mesh(ici, (n,) + (1,) * (len(AXES) - 1), devices=devices)


def _resolve_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    described = " × ".join(f"{a}={s}" for a, s in sizes.items())
    bad = [a for a, s in sizes.items() if not isinstance(s, int) or (s < 1 and s != -1)]
    if bad:
        raise MeshError(f"mesh axis sizes must be positive integers (or one -1); got {described}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1; got {described}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise MeshError(
                f"cannot fill {free[0]}=-1: the other axes ({described}) use {fixed} devices, "
                f"which does not divide the {n_devices} available"
            )
        sizes = {**sizes, free[0]: n_devices // fixed}
    elif fixed != n_devices:
        hint = f" (pass devices=jax.devices()[:{fixed}] to use a subset)" if fixed < n_devices else ""
        raise MeshError(f"mesh {described} needs {fixed} devices, but {n_devices} are available{hint}")
    return sizes


def parse_mesh(spec: str) -> dict[str, int]:
    """Mesh sizes from a flag such as "fsdp=4,tensor=2" or "data=-1,expert=8" (for make_mesh(**))."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)\s*[=:]\s*(-?\d+)", part)
        if not m or m.group(1) not in AXES:
            raise MeshError(
                f"bad mesh entry {part!r} in {spec!r}: expected AXIS=SIZE with AXIS one of {', '.join(AXES)}"
            )
        if m.group(1) in sizes:
            raise MeshError(f"mesh axis {m.group(1)} given twice in {spec!r}")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def mesh_from_config(config) -> Mesh:
    """The mesh named by a config's `mesh` field (a dict or a "fsdp=4,tensor=2" string); one device
    per axis that it leaves out."""
    spec = config.get("mesh", None) if hasattr(config, "get") else getattr(config, "mesh", None)
    if spec is None:
        return make_mesh(data=-1)
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    return make_mesh(**sizes)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


# -- multi-host ----------------------------------------------------------------------------------
_MULTI_HOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit (scripts/launch_gpu_multinode.sh)
    "COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pod slices (set on every worker)
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "SLURM_JOB_ID",  # SLURM / Open MPI: jax's cluster detection reads the rest
    "OMPI_COMM_WORLD_SIZE",
)


def _env_says_multi_host() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "TPU_WORKER_HOSTNAMES" in os.environ and len([h for h in hosts.split(",") if h]) <= 1:
        return False  # a single-host TPU VM also sets it
    for size_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        if size_var in os.environ and int(os.environ[size_var] or 1) <= 1:
            return False
    return any(v in os.environ for v in _MULTI_HOST_ENV)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
) -> tuple[int, int]:
    """Start jax's multi-host runtime when this is a multi-host job; return (process_index, process_count).

    Must run before anything touches a device. Explicit arguments win; otherwise the environment
    decides (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID on GPU clusters, or what
    jax's own cluster detection reads on TPU pods, SLURM and Open MPI). A single-host run is left
    alone, so the same script runs on a laptop and a pod. Calling it twice is harmless.
    """
    is_init = getattr(jax.distributed, "is_initialized", None)
    if is_init is not None and is_init():
        return jax.process_index(), jax.process_count()
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if force or coordinator_address is not None or _env_says_multi_host():
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    return jax.process_index(), jax.process_count()
