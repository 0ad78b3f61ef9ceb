"""One mesh for every model: mesh building, logical-axis rules, activation constraints, and the
expert-parallel MoE exchange.

Every nnx.Param names the logical axis of each of its dimensions where the model creates it
(models/layers.py `param`); this package only maps those names to the mesh axes.

    mesh = make_mesh(fsdp=4, tensor=2)                      # axes data, fsdp, tensor, expert
    graphdef, state = nnx.split(models.abstract(config), nnx.Param)   # no memory
    shardings = param_shardings(state, mesh, "fsdp", config)          # the State, NamedSharding per Param
    params = jax.jit(init, out_shardings=shardings)()                 # created sharded
    with use_mesh(mesh, RULES["fsdp"]):                      # activation constraints + expert parallelism
        logits = jax.jit(lambda p, t: models.apply(graphdef, p, t).logits)(params, tokens)
"""

from vishwam_jax.sharding.context import ActiveMesh, constrain, current, use_mesh
from vishwam_jax.sharding.mesh import (
    AXES,
    MeshError,
    auto_axes,
    initialize_distributed,
    make_mesh,
    mesh_from_config,
    mesh_sizes,
    parse_mesh,
)
from vishwam_jax.sharding.rules import (
    RULES,
    Rules,
    ShardingError,
    default_rules,
    leaf_name,
    logical_axes,
    param_shardings,
    param_specs,
    resolve_rules,
    validate,
)

__all__ = [
    "AXES",
    "RULES",
    "ActiveMesh",
    "MeshError",
    "Rules",
    "ShardingError",
    "auto_axes",
    "constrain",
    "current",
    "default_rules",
    "initialize_distributed",
    "leaf_name",
    "logical_axes",
    "make_mesh",
    "mesh_from_config",
    "mesh_sizes",
    "param_shardings",
    "param_specs",
    "parse_mesh",
    "resolve_rules",
    "use_mesh",
    "validate",
]
