"""Logical axis names → mesh axes.

Every parameter dimension and every main activation dimension has a logical name (`vocab`, `embed`,
`heads`, `experts`, ...); a rule set maps each name to zero or more mesh axes. The same model code
then runs single-device, FSDP-trained, tensor-parallel-served or expert-parallel by changing only the
rule set. Parameters and activations have separate tables because the same name wants different
placements: a weight's `embed` dimension is sharded over `fsdp` (ZeRO-3) while the residual stream's
`embed` dimension stays whole (its batch is what is split).

Presets (`RULES[name]`), for the mesh axes of sharding/mesh.py:
    single  everything replicated (one device, or pure data parallelism)
    fsdp    training: weights sharded over fsdp on their embed (or low-rank) dimension, and over
            tensor on heads / MLP width / vocabulary; batch over data × fsdp × expert
    tensor  serving: weights resident (no per-step gathers), heads / MLP width / vocabulary over
            tensor, experts over expert; batch over data × fsdp × expert
    expert  expert-parallel MoE training: `fsdp` plus experts over expert (tokens reach them by
            all-to-all in models/moe.py); dense weights sharded over fsdp × expert
Axes of size 1 are ignored, so every preset is valid on every mesh that divides the dimensions.

The names are the parameters' own: each nnx.Param carries one per dimension from where the model
creates it (models/layers.py `param`), stacked layers with "layers" in front (never sharded). Nothing
here looks at a parameter's path, rank or size to decide its placement; a parameter without names
is a ShardingError. A dimension of size 1 stays whole, so an int8 weight's per-channel scale (size 1
on the contracted axes, the weight's names otherwise) is split exactly like its weight elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vishwam_jax.sharding.mesh import auto_axes, mesh_sizes

LogicalAxes = tuple[str | None, ...]


class ShardingError(ValueError):
    """A mesh / rule set that cannot shard a model (the message names the dimension)."""


@dataclass(frozen=True)
class Rules:
    """Logical name → mesh axes (tuples, outermost first), for parameters and for activations."""

    name: str
    params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    activations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))

    def replace(
        self, *, name: str | None = None, params: Mapping | None = None, activations: Mapping | None = None
    ) -> Rules:
        """A copy with some names remapped, e.g. RULES["fsdp"].replace(params={"vocab": ()})."""
        return Rules(name or self.name, {**self.params, **(params or {})}, {**self.activations, **(activations or {})})

    def __hash__(self):
        return hash((self.name, tuple(sorted(self.params.items())), tuple(sorted(self.activations.items()))))


# Activations every preset shares: batch over every data-like axis (expert counts as one outside MoE
# layers), attention heads / MLP width / logits over tensor, sequence and residual width whole.
_ACTIVATIONS = {
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
}
_TENSOR_PARAMS = {
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
}
# FSDP shards each matrix along its input (embed or low-rank) dimension: every large weight has one.
_FSDP_PARAMS = {**_TENSOR_PARAMS, "embed": ("fsdp",), "q_lora": ("fsdp",), "kv_lora": ("fsdp",)}

RULES: Mapping[str, Rules] = MappingProxyType(
    {
        "single": Rules("single", {}, {}),
        "fsdp": Rules("fsdp", _FSDP_PARAMS, _ACTIVATIONS),
        "tensor": Rules("tensor", {**_TENSOR_PARAMS, "experts": ("expert",)}, _ACTIVATIONS),
        # The expert axis splits the batch outside MoE layers, so the dense weights' embed dimension
        # is sharded over it too (ZeRO over fsdp × expert); a stacked expert weight gets `expert` on
        # its experts dimension first (an axis is used once per array) and keeps fsdp on embed.
        "expert": Rules("expert", {**_FSDP_PARAMS, "embed": ("fsdp", "expert"), "experts": ("expert",)}, _ACTIVATIONS),
    }
)


def default_rules(mesh: Mesh) -> Rules:
    """expert if the mesh has an expert axis, else fsdp if it has one, else tensor (which is
    all-replicated on a mesh without a tensor axis)."""
    sizes = mesh_sizes(mesh)
    if sizes.get("expert", 1) > 1:
        return RULES["expert"]
    if sizes.get("fsdp", 1) > 1:
        return RULES["fsdp"]
    return RULES["tensor"]


def resolve_rules(rules: Rules | str | None, mesh: Mesh) -> Rules:
    if rules is None:
        return default_rules(mesh)
    if isinstance(rules, str):
        if rules not in RULES:
            raise ShardingError(f"unknown rule preset {rules!r}; known: {', '.join(RULES)}")
        return RULES[rules]
    if not isinstance(rules, Rules):
        raise ShardingError(
            f"rules must be a Rules, a preset name ({', '.join(RULES)}) or None; got {type(rules).__name__}"
        )
    return rules


# -- logical names of every parameter --------------------------------------------------------------
# Each nnx.Param names its axes where the model creates it (models/layers.py `param`); these helpers
# read them back. Nothing here looks at a parameter's name or size.
def leaf_name(path) -> str:
    """The dotted name of a leaf ("blocks.layers.0.attn.q.kernel")."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return ".".join(out)


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _axes_of(path, leaf) -> tuple[LogicalAxes, tuple[int, ...]]:
    """(logical names, shape) of one parameter; a ShardingError if it has no name per dimension.

    Only an nnx.Variable carries names: a bare array (a pure dict instead of the nnx.State) is
    refused rather than placed by a guess."""
    if not _is_variable(leaf):
        raise ShardingError(
            f"parameter {leaf_name(path)} is a bare {type(leaf).__name__}, not an nnx.Variable: pass the nnx.State of "
            "the module's Params (nnx.split(module, nnx.Param) or nnx.split(models.abstract(config), nnx.Param)), "
            "whose Params carry their logical axes"
        )
    axes = leaf.get_metadata().get("out_sharding")
    shape = tuple(leaf.get_value().shape)
    if axes is None or isinstance(axes, str) or len(axes) != len(shape):
        raise ShardingError(
            f"parameter {leaf_name(path)} of shape {shape} has no logical axis name per dimension (got {axes!r}); "
            "create it with models.layers.param(value, axes)"
        )
    return tuple(axes), shape


def logical_axes(state: Any) -> Any:
    """A tree like the parameter state `state` (an nnx.State of Params, concrete or abstract) with
    the tuple of logical axis names of each parameter as its leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, v: _axes_of(path, v)[0], state, is_leaf=_is_variable)


# -- names → PartitionSpecs --------------------------------------------------------------------------
# When a mesh axis is a multiple of these dimensions, the dimension is replicated rather than
# rejected: MQA / GQA with fewer KV heads than tensor shards keeps a copy of each KV head per shard.
_REPLICATE_IF_FEWER = frozenset({"kv_heads"})

# For error messages: the config fields a logical dimension comes from, in order of preference.
_CONFIG_FIELDS = {
    "vocab": ("vocab_size",),
    "embed": ("d_model",),
    "heads": ("num_heads",),
    "kv_heads": ("num_kv_heads",),
    "head_dim": ("head_dim", "qk_nope_head_dim", "v_head_dim"),
    "mlp": ("ffn_dim",),
    "expert_mlp": ("moe_ffn_dim",),
    "experts": ("num_experts",),
    "q_lora": ("q_lora_rank",),
    "kv_lora": ("kv_lora_rank",),
}


def describe_dim(config, logical: str | None, size: int) -> str:
    """ "num_kv_heads=8" when a config field explains the size, else "kv_lora=576"."""
    for f in _CONFIG_FIELDS.get(logical or "", ()):
        if config is not None and config.get(f) == size:
            return f"{f}={size}"
    return f"{logical or 'dimension'}={size}"


def _axes_desc(axes: tuple[str, ...], sizes: dict[str, int]) -> str:
    if len(axes) == 1:
        return f"{axes[0]}={sizes[axes[0]]}"
    return f"{'×'.join(axes)}={math.prod(sizes[a] for a in axes)}"


def spec_for(
    names: LogicalAxes,
    shape: tuple[int, ...],
    mesh: Mesh,
    table: Mapping[str, tuple[str, ...]],
    *,
    strict: bool,
    errors: list[tuple[int, str | None, tuple[str, ...]]] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of one array.

    A mesh axis is used at most once (the first dimension that asks for it gets it) and axes of
    size 1 are skipped. strict (parameters): a dimension the mesh does not divide is recorded in
    `errors` as (dim, name, axes) and left whole. Not strict (activations, e.g. a batch of 1 while
    decoding): the longest prefix of its axes that divides it is used.
    """
    sizes = mesh_sizes(mesh)
    used: set[str] = set()
    out: list[Any] = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        wanted = tuple(a for a in (table.get(name, ()) if name else ()) if sizes.get(a, 1) > 1 and a not in used)
        if not wanted or size == 1:
            out.append(None)
            continue
        total = math.prod(sizes[a] for a in wanted)
        if size % total:
            if name in _REPLICATE_IF_FEWER and total % size == 0:
                out.append(None)
                continue
            if strict:
                if errors is not None:
                    errors.append((dim, name, wanted))
                out.append(None)
                continue
            while wanted and size % math.prod(sizes[a] for a in wanted):
                wanted = wanted[:-1]
            if not wanted:
                out.append(None)
                continue
        used.update(wanted)
        out.append(wanted[0] if len(wanted) == 1 else wanted)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _param_specs(state: Any, mesh: Mesh, rules: Rules, config=None) -> tuple[Any, list[str]]:
    sizes = mesh_sizes(mesh)
    problems: list[str] = []

    def one(path, variable):
        axes, shape = _axes_of(path, variable)
        errors: list = []
        spec = spec_for(axes, shape, mesh, rules.params, strict=True, errors=errors)
        for dim, name, mesh_axes in errors:
            problems.append(
                f"{_axes_desc(mesh_axes, sizes)} does not divide {describe_dim(config, name, shape[dim])} "
                f"(parameter {leaf_name(path)}, dimension {dim} {name!r} of shape {shape})"
            )
        return variable.replace(spec)

    specs = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)
    return specs, problems


def _config_problems(config, mesh: Mesh) -> list[str]:
    """Whole-model constraints no single parameter shows: expert parallelism needs the experts to
    split evenly over the expert axis whatever the parameter rules say (models/moe.py)."""
    ep = mesh_sizes(mesh).get("expert", 1)
    experts = config.get("num_experts") if config is not None else None
    if ep > 1 and experts and experts % ep:
        return [f"expert={ep} does not divide num_experts={experts} (expert parallelism splits the experts evenly)"]
    return []


def _raise(problems: list[str], mesh: Mesh, rules: Rules) -> None:
    # Every problem is shown: with the layers stacked there is one line per kind of parameter, not
    # per layer, so even the 671B model's list stays short.
    shown = "\n  ".join(problems)
    raise ShardingError(f"mesh {dict(mesh_sizes(mesh))} with rules {rules.name!r} cannot shard this model:\n  {shown}")


def validate(state: Any, mesh: Mesh, rules: Rules | str | None = None, config=None) -> None:
    """Raise ShardingError naming every dimension the mesh does not divide under `rules`."""
    param_specs(state, mesh, rules, config)


def param_specs(state: Any, mesh: Mesh, rules: Rules | str | None = None, config=None) -> Any:
    """The parameter state with a PartitionSpec in place of each value, from each parameter's own
    logical axes (validated: raises ShardingError rather than mis-shard). `config` only improves the
    messages (the field a dimension comes from) and checks whole-model constraints."""
    rules = resolve_rules(rules, mesh)
    specs, problems = _param_specs(state, mesh, rules, config)
    problems = _config_problems(config, mesh) + problems
    if problems:
        _raise(problems, mesh, rules)
    return specs


def param_shardings(state: Any, mesh: Mesh, rules: Rules | str | None = None, config=None) -> Any:
    """The parameter state with a NamedSharding in place of each value: usable as `out_shardings`
    of a jitted initialiser, or (`.to_pure_dict()`) as the target of a sharded restore.

    rules: a Rules, a preset name from RULES, or None for default_rules(mesh).
    """
    mesh = auto_axes(mesh)
    specs = param_specs(state, mesh, rules, config)
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
