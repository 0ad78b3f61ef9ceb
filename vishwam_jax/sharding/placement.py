"""Serving an EPLB placement (sharding/eplb.py): MoE layers whose expert axis holds R >= E physical
slots, the hot experts replicated, each slot's weights a copy of its logical expert's.

    model = vj.load(path, mesh=mesh, rules="expert", expert_placement="placement.json")
    model.set_expert_placement(new_placement)      # same slot count: no recompilation, no restart

The expert weights [L, E, ...] are restored sharded as usual, then gathered once into [L, R, ...]
directly with the sharding of the placed model (each device ends up with exactly its own slots);
the gather's peak is the logical plus the physical expert weights of one leaf at a time. Each MoE
layer also carries its placement's tables (`SlotTable` params log2phy and logcnt), which the dispatch
(models/moe.py `to_slots`) reads to send each token to one replica of its expert. The tables and the
slots are plain arrays passed into the jitted forward, so a new placement with the same slot count
reuses every compilation.

Only the main MoE layers are placed (DeepSeek-V3's MTP block keeps one slot per expert). A placed
model is for serving: the tables are integer params, which the train step does not differentiate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vishwam_jax.sharding.eplb import Placement, PlacementError

# Where each family keeps the stack of layers that a placement's rows describe, in order.
_MOE_STACKS = {"deepseek_v3": "moe_layers", "grok1": "layers"}


def moe_stack(config) -> str:
    if config.family not in _MOE_STACKS:
        raise PlacementError(f"{config.family} has no MoE layers to place experts on")
    return _MOE_STACKS[config.family]


def num_moe_layers(config) -> int:
    return config.num_layers - (config.num_dense_layers if config.family == "deepseek_v3" else 0)


def check(placement: Placement, config) -> None:
    name = config.get("name") or config.family
    layers = num_moe_layers(config)
    if placement.num_experts != config.num_experts or placement.num_layers != layers:
        raise PlacementError(
            f"the placement is for {placement.num_layers} MoE layers of {placement.num_experts} experts; "
            f"{name} has {layers} of {config.num_experts}"
        )


def placed_config(config, placement: Placement):
    from vishwam_jax.presets import replace

    check(placement, config)
    return replace(config, num_expert_slots=placement.num_slots)


def _is_leaf(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _expert_leaf(names: tuple[str, ...], stack_name: str) -> bool:
    return len(names) > 2 and names[0] == stack_name and names[1] == "experts" and names[2] in ("gate", "up", "down")


def _gather(value, index: np.ndarray | jax.Array, sharding=None):
    """value[l, index[l]] on the slot axis (1) of a stacked leaf, or per buffer of `Layers`."""
    from vishwam_jax.models.stack import Layers

    if isinstance(value, Layers):
        shardings = [getattr(a, "sharding", None) for a in value.arrays]
        return Layers(
            jax.jit(lambda a, i: a[i], out_shardings=s)(a, jnp.asarray(i))
            for a, i, s in zip(value.arrays, index, shardings)
        )
    fn = jax.jit(lambda a, i: jax.vmap(lambda w, j: w[j])(a, i), out_shardings=sharding)
    return fn(value, jnp.asarray(index))


def _tables(placement: Placement, layers_like) -> dict[str, Any]:
    from vishwam_jax.models.stack import Layers

    tables = {"log2phy": placement.log2phy, "logcnt": placement.logcnt}
    if isinstance(layers_like, Layers):
        return {k: Layers(jnp.asarray(row) for row in v) for k, v in tables.items()}
    return {k: jnp.asarray(v) for k, v in tables.items()}


def apply_placement(
    model, placement: Placement | str | Path, *, mesh=None, rules=None, unstack_layers: bool | None = None
):
    """A new `Model` serving `model` (one slot per expert, stacked layers) with `placement`'s slots.

    mesh, rules: where the placed weights go (as `load` places them); with no mesh they stay on the
    default device. unstack_layers: as `load` (default: on GPUs)."""
    from vishwam_jax import models
    from vishwam_jax.model import Model
    from vishwam_jax.models import stack

    placement = Placement.load(placement)
    if model.config.get("num_expert_slots", 0):
        raise PlacementError("the model already serves a placement: use model.set_expert_placement(...)")
    config = placed_config(model.config, placement)
    stack_name = moe_stack(config)
    graphdef, abstract = nnx.split(models.abstract(config, _dtype_of(model.params)), nnx.Param)
    shardings = None
    if mesh is not None:
        from vishwam_jax.sharding import param_shardings

        shardings = param_shardings(abstract, mesh, rules, config)
    old = {_path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(model.params, is_leaf=_is_leaf)[0]}
    tables = None

    def fill(path, variable):
        nonlocal tables
        names = _path_names(path)
        target = None
        if shardings is not None:
            target = _lookup(shardings, names)
        if names[-1] in ("log2phy", "logcnt") and names[0] == stack_name:
            tables = tables or _tables(placement, None)
            value = tables[names[-1]]
            return variable.replace(value if target is None else jax.device_put(value, target))
        source = old[names].get_value()
        if _expert_leaf(names, stack_name):
            return variable.replace(_gather(source, placement.phy2log, target))
        if target is not None and getattr(source, "sharding", None) != target:
            source = jax.device_put(source, target)
        return variable.replace(source)

    params = jax.tree_util.tree_map_with_path(fill, abstract, is_leaf=_is_leaf)
    unstack = jax.default_backend() == "gpu" if unstack_layers is None else bool(unstack_layers)
    if unstack:
        params = stack.unstack_layers(params, delete_stacked=True)
    return Model(nnx.merge(graphdef, params), model.tokenizer)


def _lookup(tree, names: tuple[str, ...]):
    node = tree
    for n in names:
        node = node[int(n) if isinstance(node, (list, tuple)) else n]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def _dtype_of(params):
    """The float dtype of the model's weights (the placed model is built like the original)."""
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2:
            return leaf.dtype
    return jnp.float32


def current_placement(model) -> Placement:
    """The placement a placed model serves, read back from its tables (phy2log from log2phy)."""
    stack_name = moe_stack(model.config)
    experts = model.params[stack_name]["experts"]
    log2phy = _host(experts["log2phy"].get_value())
    logcnt = _host(experts["logcnt"].get_value())
    slots = model.config.num_expert_slots
    phy2log = np.full((log2phy.shape[0], slots), -1, np.int32)
    for layer in range(log2phy.shape[0]):
        for e in range(log2phy.shape[1]):
            phy2log[layer, log2phy[layer, e, : logcnt[layer, e]]] = e
    return Placement(phy2log, model.config.num_experts)


def _host(value) -> np.ndarray:
    from vishwam_jax.models.stack import Layers

    if isinstance(value, Layers):
        return np.stack([np.asarray(a) for a in value.arrays])
    return np.asarray(value)


def _like(table, value):
    """`table` on the devices (and in the per-layer form) of the table `value` it replaces."""
    from vishwam_jax.models.stack import Layers

    if isinstance(value, Layers):
        return Layers(jax.device_put(t, a.sharding) for t, a in zip(table.arrays, value.arrays))
    return jax.device_put(table, value.sharding)


def replace_placement(model, placement: Placement | str | Path) -> None:
    """Move `model` (already placed) to `placement` in place, on device: slot r of layer l takes the
    weights of expert phy2log[l, r] from whichever slot held that expert before. The slot count must
    stay the same, so the shapes (and every compiled forward) stay the same."""
    placement = Placement.load(placement)
    slots = model.config.get("num_expert_slots", 0)
    if not slots:
        raise PlacementError("the model serves no placement: load it with expert_placement=... first")
    check(placement, model.config)
    if placement.num_slots != slots:
        raise PlacementError(
            f"the model has {slots} expert slots; the placement has {placement.num_slots} "
            "(load again with it to change the slot count)"
        )
    stack_name = moe_stack(model.config)
    before = current_placement(model)
    # A slot of the old layout for each new slot: any old replica of the expert will do (all equal).
    source_slot = np.take_along_axis(before.log2phy[:, :, 0], placement.phy2log.astype(np.int64), axis=-1)

    def move(path, variable):
        names = _path_names(path)
        value = variable.get_value()
        if names[0] == stack_name and names[-1] in ("log2phy", "logcnt"):
            return variable.replace(_like(_tables(placement, value)[names[-1]], value))
        if _expert_leaf(names, stack_name):
            return variable.replace(_gather(value, source_slot, getattr(value, "sharding", None)))
        return variable

    model.params = jax.tree_util.tree_map_with_path(move, model.params, is_leaf=_is_leaf)
