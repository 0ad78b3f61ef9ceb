"""Where the train state and the batches live on a mesh (vishwam_jax.sharding provides the mesh,
the rule presets and the per-parameter shardings from each nnx.Param's logical axes; this module
applies them to training's trees).

Without a mesh every function here places nothing and the trainer runs on the default device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def model_shardings(params: nnx.State, mesh: Mesh, rules, config=None) -> nnx.State:
    """The parameters' shardings from their own logical axes (concrete or abstract state) by the
    rules of vishwam_jax.sharding: the same nnx.State with a NamedSharding per parameter."""
    from vishwam_jax.sharding import param_shardings

    return param_shardings(params, mesh, rules, config)


def state_shardings(
    trainable_shardings: Any, trainable_shapes: Any, optimizer: optax.GradientTransformation, mesh: Mesh
) -> dict:
    """Shardings of {"step", "params", "opt_state"}: Adam's moments are sharded like the parameters
    they track (so FSDP shards the optimizer state too); counters and the like are replicated.
    The trainable tree is the model's nnx.State (full training) or the LoRA adapters' dict."""
    opt_shapes = jax.eval_shape(optimizer.init, trainable_shapes)
    # Leaves the optimizer leaves alone (optax.multi_transform's frozen group) hold a MaskedNode
    # where the parameter tree has an array: keep it (it has no buffer to place).
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt = optax.tree_map_params(
        optimizer,
        lambda leaf, s: leaf if masked(leaf) else s,
        opt_shapes,
        trainable_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=masked,
    )
    return {"step": replicated(mesh), "params": trainable_shardings, "opt_state": opt}


def batch_sharding(mesh: Mesh, rules, micro_batch: int) -> NamedSharding:
    """[micro_batches, batch, seq + 1] with the batch split over the rules' data-like axes."""
    sizes = dict(mesh.shape)
    axes = tuple(a for a in rules.activations.get("batch", ()) if sizes.get(a, 1) > 1)
    n = math.prod(sizes[a] for a in axes) if axes else 1
    if micro_batch % n:
        raise ValueError(
            f"the micro-batch of {micro_batch} rows does not divide over the mesh's batch axes "
            f"{' × '.join(f'{a}={sizes[a]}' for a in axes)} = {n}; use a batch size (/ grad accumulation) "
            f"that is a multiple of {n}"
        )
    return NamedSharding(mesh, PartitionSpec(None, axes if axes else None))


def local_rows(sharding: NamedSharding, global_shape: tuple[int, int, int]) -> np.ndarray:
    """Indices, into the flattened [micro_batches * batch] rows, of the rows this process's devices
    hold (each host then reads only its own windows)."""
    k, b, _ = global_shape
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        micro = range(k)[index[0]]
        row = range(b)[index[1]]
        rows.update(m * b + r for m in micro for r in row)
    return np.asarray(sorted(rows))


def device_batch(
    host_rows: np.ndarray, sharding: NamedSharding | None, global_shape: tuple[int, int, int]
) -> jax.Array:
    """This process's rows [k, local b, t + 1] as one global array (or, without a mesh, the batch)."""
    if sharding is None:
        return jax.device_put(host_rows.reshape(global_shape))
    k = global_shape[0]
    return jax.make_array_from_process_local_data(sharding, host_rows.reshape(k, -1, global_shape[2]), global_shape)
