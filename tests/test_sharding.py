"""One mesh for every family: mesh building, logical names on every parameter, rule presets, clear
errors for meshes that do not divide a dimension, sharded forwards equal to single-device ones
(fsdp × tensor, and expert-parallel MoE), and restoring a checkpoint onto another mesh."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import vishwam_jax as vj
from vishwam_jax import models
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.model import Model
from vishwam_jax.presets import get_config
from vishwam_jax.sharding import (
    MeshError,
    ShardingError,
    constrain,
    expert_parallel,
    initialize_distributed,
    leaf_name,
    logical_axes,
    make_mesh,
    param_shardings,
    param_specs,
    parse_mesh,
    use_mesh,
    validate,
)

FAMILY_PRESETS = [
    p for p in ("gemma-tiny", "gemma2-tiny", "gemma3-tiny", "grok-1-tiny", "deepseek-v3-tiny") if p in vj.list_models()
]
MOE_PRESETS = [p for p in ("grok-1-tiny", "deepseek-v3-tiny") if p in vj.list_models()]
FULL_PRESETS = [p for p in vj.list_models() if not p.endswith("-tiny")]  # the published (and demo) sizes
# The byte-level demo model's 259-entry vocabulary splits over no even mesh axis: not a training layout.
TRAINING_PRESETS = FAMILY_PRESETS + [p for p in FULL_PRESETS if p != "gemma-shakespeare"]


def small_config(name: str):
    """The preset cut to every kind of layer, each kind stacked at least twice where the scan needs
    it (so the sharded paths run inside lax.scan): Gemma 2/3 as two sliding + global periods,
    DeepSeek-V3 as one dense + two MoE layers without MTP, Gemma 1 and Grok-1 as two layers. Scanned,
    the extra layers cost no compile time."""
    config = get_config(name)
    overrides = {"num_layers": 2}
    if config.family == "gemma" and config.sliding_window:
        overrides.update(num_layers=4, sliding_window_pattern=2)  # layers 0, 2 sliding; 1, 3 global
    if config.family == "deepseek_v3":
        overrides.update(num_layers=3, num_dense_layers=1, num_mtp_layers=0)
    return get_config(name, **overrides)


def _shard_map_inside_scan(jaxpr, in_scan: bool = False) -> bool:
    """Whether a shard_map (expert exchange, width-parallel experts, a per-device kernel) runs in the
    body of a lax.scan somewhere in `jaxpr`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map" and in_scan:
            return True
        inside = in_scan or eqn.primitive.name == "scan"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and _shard_map_inside_scan(sub, inside):
                    return True
    return False


def abstract_state(config, dtype=jnp.float32) -> nnx.State:
    """The Params of the family module as ShapeDtypeStructs (structure and logical axes, no memory)."""
    return nnx.split(models.abstract(config, dtype), nnx.Param)[1]


def at(tree, path: str):
    """The entry of a nested (pure-dict) tree at a dotted path, "blocks.layers.0.attn.q.kernel"."""
    for key in path.split("."):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


def _tokens(config, batch=8, length=8, seed=0):
    return np.random.default_rng(seed).integers(3, min(config.vocab_size, 250), (batch, length)).astype(np.int32)


# -- meshes --------------------------------------------------------------------------------------------
def test_make_mesh_axes_sizes_and_errors():
    mesh = make_mesh(fsdp=2, tensor=2, expert=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
    assert dict(make_mesh(data=-1, tensor=2).shape)["data"] == 4
    with pytest.raises(MeshError, match=r"tensor=3 × expert=1 needs 3 devices, but 8 are available"):
        make_mesh(tensor=3)
    with pytest.raises(MeshError, match="cannot fill data=-1"):
        make_mesh(data=-1, tensor=3)
    assert dict(make_mesh(tensor=3, devices=jax.devices()[:3]).shape)["tensor"] == 3
    assert parse_mesh("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(MeshError, match="bad mesh entry 'pipeline=2'"):
        parse_mesh("pipeline=2")


def test_initialize_distributed_only_for_multi_host_jobs(monkeypatch):
    """A laptop / single-host run is left alone; a coordinator address (GPU clusters) or a multi-worker
    TPU pod environment starts jax.distributed with the explicit arguments winning over the env."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    if hasattr(jax.distributed, "is_initialized"):
        monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() == (0, 1) and calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # a single-host TPU VM sets it too
    initialize_distributed()
    assert calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")  # a v5p-32 pod slice: jax reads the rest
    initialize_distributed()
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    initialize_distributed(process_id=3)
    assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)


def test_mesh_device_order_comes_from_jax_make_mesh():
    """Axis order data, fsdp, tensor, expert with the topology-aware assignment of jax.make_mesh
    (on a GPU host / TPU slice the innermost axes land on NVLink / ICI neighbours)."""
    mesh = make_mesh(data=2, tensor=4)
    ref = jax.make_mesh((2, 1, 4, 1), ("data", "fsdp", "tensor", "expert"), devices=jax.devices())
    assert [d.id for d in mesh.devices.flat] == [d.id for d in ref.devices.flat]


def test_multi_slice_mesh_puts_only_data_across_slices():
    """On a multi-slice TPU job (devices carry slice_index) the data axis spans the slices and every
    other axis stays inside one slice; a layout that would put another axis across DCN is refused."""
    from vishwam_jax.sharding.mesh import multi_slice_grid, num_slices

    class Dev:  # what mesh_utils reads of a TPU device
        platform = device_kind = "cpu"

        def __init__(self, i):
            self.id, self.slice_index, self.process_index = i, i // 4, i // 2

    devices = [Dev(i) for i in range(8)]
    assert num_slices(devices) == 2 and num_slices(jax.devices()) == 1
    grid = multi_slice_grid({"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}, devices)
    assert grid.shape == (2, 2, 2, 1)
    assert [{d.slice_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
    with pytest.raises(MeshError, match="the devices span 2 slices: data .* must be a multiple of 2"):
        multi_slice_grid({"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}, devices)


# -- logical names and rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_every_parameter_of_a_built_model_names_each_dimension(name):
    """nnx.get_partition_spec over a real model's Params: one logical name (or None) per dimension
    of every parameter, as created; sharding/ reads the same names."""
    model = vj.load(name)
    state = nnx.state(model.module, nnx.Param)
    specs = nnx.get_partition_spec(state)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(flat_specs) > 0
    for (path, leaf), spec in zip(flat, flat_specs):
        assert len(spec) == leaf.ndim, f"{leaf_name(path)} {leaf.shape}: {spec}"
    assert jax.tree_util.tree_leaves(logical_axes(state), is_leaf=lambda x: isinstance(x, tuple)) == [
        tuple(s) for s in flat_specs
    ]


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_every_parameter_of_the_published_sizes_names_each_dimension(name):
    """The same for every full-size preset, abstractly (models.abstract: nothing is allocated)."""
    state = abstract_state(get_config(name), jnp.bfloat16)
    specs = nnx.get_partition_spec(state)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(flat_specs) > 0
    for (path, leaf), spec in zip(flat, flat_specs):
        assert len(spec) == len(leaf.shape), f"{leaf_name(path)} {leaf.shape}: {spec}"


@pytest.mark.parametrize("name", TRAINING_PRESETS)
def test_every_large_parameter_is_named_and_sharded_for_training(name):
    """Under RULES["fsdp"] on fsdp=2 × tensor=2 every matrix except the routers is split somewhere:
    a parameter created with names the rules do not shard would silently be replicated on every device."""
    config = get_config(name)
    state = abstract_state(config, jnp.bfloat16)
    names = logical_axes(state)
    specs = param_specs(state, make_mesh(data=2, fsdp=2, tensor=2), "fsdp", config)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_names = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(flat_names) == len(flat_specs)
    for (path, leaf), leaf_names, spec in zip(flat, flat_names, flat_specs):
        assert len(leaf_names) == len(leaf.shape)
        # Stacked layers add a leading "layers" axis: a matrix is rank >= 2 without it.
        rank = len(leaf.shape) - (leaf_names[:1] == ("layers",))
        if rank >= 2 and "router" not in leaf_name(path):
            assert any(spec), f"{leaf_name(path)} {leaf.shape} {leaf_names} is replicated under fsdp"
    assert nnx.to_pure_dict(names)["embed"]["embedding"] == ("vocab", "embed")


def test_a_parameter_without_axes_is_an_error():
    """At construction (models.layers.param) and, for a Param made some other way or a bare array,
    wherever sharding/ would have to guess."""
    from vishwam_jax.models.layers import MissingAxesError, check_axes, param

    with pytest.raises(MissingAxesError, match=r"shape \(2, 3\) needs one logical axis per dimension"):
        param(jnp.ones((2, 3)), ("embed",))

    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 8)))  # no out_sharding metadata at all
            self.ok = param(jnp.ones((8,)), ("norm",))

    mesh = make_mesh(fsdp=2, devices=jax.devices()[:2])
    state = nnx.state(Bare(), nnx.Param)
    with pytest.raises(ShardingError, match=r"parameter w of shape \(4, 8\) has no logical axis name per dimension"):
        param_specs(state, mesh, "fsdp")
    with pytest.raises(ShardingError, match="parameter w of shape"):
        logical_axes(state)
    with pytest.raises(ShardingError, match="parameter w of shape"):
        param_shardings(state, mesh, "fsdp")
    with pytest.raises(MissingAxesError, match="w"):
        check_axes(Bare())
    with pytest.raises(ShardingError, match=r"parameter embed\.embedding is a bare ndarray, not an nnx.Variable"):
        param_specs({"embed": {"embedding": np.ones((4, 8))}}, mesh, "fsdp")  # a pure dict: no names to read


def test_family_specific_names():
    if "deepseek-v3-tiny" in FAMILY_PRESETS:
        names = nnx.to_pure_dict(logical_axes(abstract_state(get_config("deepseek-v3-tiny"))))
        moe_layers = names["moe_layers"]  # stacked: "layers" in front of each parameter's own names
        assert at(moe_layers, "experts.down.kernel") == ("layers", "experts", "expert_mlp", "embed")
        assert at(moe_layers, "attn.wkv_a.kernel") == ("layers", "embed", "kv_lora")
        assert at(moe_layers, "attn.wq_b.kernel") == ("layers", "q_lora", "heads", "head_dim")
        assert at(moe_layers, "shared.gate.kernel") == ("layers", "embed", "mlp")
        assert at(moe_layers, "router.kernel") == ("layers", "embed", "router_experts")
        assert at(names, "lm_head.kernel") == ("embed", "vocab")
    if "grok-1-tiny" in FAMILY_PRESETS:
        names = nnx.to_pure_dict(logical_axes(abstract_state(get_config("grok-1-tiny"))))
        assert at(names, "layers.experts.gate.kernel") == ("layers", "experts", "embed", "expert_mlp")
        assert at(names, "layers.router.kernel") == ("layers", "embed", "router_experts")
    names = nnx.to_pure_dict(logical_axes(abstract_state(get_config("gemma2-tiny"))))
    assert at(names, "blocks.layers.0.attn.k.kernel") == ("layers", "embed", "kv_heads", "head_dim")
    assert at(names, "blocks.layers.0.attn.o.kernel") == ("layers", "heads", "head_dim", "embed")


def test_int8_leaves_shard_like_their_weight_with_whole_scale_axes():
    """Grok-1 with its released int8 weights: each scale carries its kernel's names, and its size-1
    (contracted) axes stay whole while the others split with the kernel."""
    config = get_config("grok-1-tiny", quantization="int8")
    specs = nnx.to_pure_dict(
        param_specs(abstract_state(config), make_mesh(fsdp=2, tensor=2, expert=2), "expert", config)
    )
    down = at(specs, "layers.experts.down")  # K-major [layers, experts, embed, expert_mlp], scale [.., .., .., 1]
    assert down["kernel"] == P(None, "expert", "fsdp", "tensor")
    assert down["kernel_scale"] == P(None, "expert", "fsdp")
    q = at(specs, "layers.attn.q")  # [layers, embed, heads, head_dim], scale [.., 1, .., ..]
    assert q["kernel"] == P(None, ("fsdp", "expert"), "tensor")
    assert q["kernel_scale"] == P(None, None, "tensor")


def test_presets_place_weights_as_documented():
    config = small_config("gemma2-tiny")
    state = abstract_state(config)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    specs = lambda mesh, rules, c=config, s=state: nnx.to_pure_dict(param_specs(s, mesh, rules, c))  # noqa: E731
    q = lambda rules: at(specs(mesh, rules), "blocks.layers.0.attn.q.kernel")  # noqa: E731
    assert q("fsdp") == P(None, "fsdp", "tensor")  # [layers, embed, heads, head_dim]
    assert q("tensor") == P(None, None, "tensor")  # serving: resident, heads split
    assert q("single") == P()
    assert at(specs(mesh, "fsdp"), "embed.embedding") == P("tensor", "fsdp")
    # expert preset: the expert axis is data-parallel outside MoE layers, so dense weights shard over it too.
    assert at(specs(make_mesh(fsdp=2, expert=4), "expert"), "blocks.layers.0.attn.q.kernel") == P(
        None, ("fsdp", "expert")
    )
    # MQA: one KV head is replicated over tensor rather than rejected.
    mqa = small_config("gemma-tiny")
    assert at(specs(mesh, "fsdp", mqa, abstract_state(mqa)), "blocks.layers.0.attn.k.kernel") == P(None, "fsdp")


def test_mesh_that_does_not_divide_a_dimension_names_it():
    config = small_config("gemma2-tiny")  # 4 heads, 2 KV heads, d_model 64
    state = abstract_state(config)
    bad = make_mesh(tensor=3, devices=jax.devices()[:3])
    with pytest.raises(ShardingError) as err:
        validate(state, bad, "tensor", config)
    msg = str(err.value)
    assert "tensor=3 does not divide num_kv_heads=2 (parameter blocks.layers.0.attn.k.kernel" in msg
    assert "tensor=3 does not divide num_heads=4 (parameter blocks.layers.0.attn.q.kernel" in msg
    with pytest.raises(ShardingError, match=r"fsdp=3 does not divide d_model=64 \(parameter embed\.embedding"):
        param_shardings(state, make_mesh(fsdp=3, devices=jax.devices()[:3]), "fsdp", config)
    if MOE_PRESETS:
        moe_config = small_config(MOE_PRESETS[0])
        with pytest.raises(ShardingError, match=f"expert=3 does not divide num_experts={moe_config.num_experts}"):
            validate(abstract_state(moe_config), make_mesh(expert=3, devices=jax.devices()[:3]), config=moe_config)
    with pytest.raises(ShardingError, match="tensor=3 does not divide"):
        vj.load("gemma2-tiny", mesh=bad, rules="tensor")
    validate(state, make_mesh(fsdp=2, tensor=2, data=2), "fsdp", config)  # a good mesh passes


def test_constraints_only_under_use_mesh():
    x = jnp.ones((1, 4, 8))
    f = lambda x: constrain(x, ("batch", "length", "embed")) * 2
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))
    mesh = make_mesh(data=8)
    with use_mesh(mesh, "fsdp"):
        assert "sharding_constraint" in str(jax.make_jaxpr(f)(x))
        y = jax.jit(f)(x)  # a batch of 1 on data=8: the constraint drops the axis instead of failing
        z = jax.jit(f)(jnp.ones((8, 4, 8)))
    assert y.shape == (1, 4, 8)
    assert z.sharding.spec == P("data")


# -- sharded forwards ----------------------------------------------------------------------------------
@functools.cache
def _reference(name):
    """(model, tokens, single-device logits), shared by the cases of one preset."""
    model = vj.load(small_config(name), seed=1)  # one compiled init
    tokens = _tokens(model.config)
    return model, tokens, model.logits(tokens)


def _sharded_case(name, sizes, rules):
    model, tokens, ref = _reference(name)
    mesh = make_mesh(**sizes)
    sharded = jax.device_put(model.params, param_shardings(model.params, mesh, rules, model.config))
    with use_mesh(mesh, rules):
        out = Model(nnx.merge(model.graphdef, sharded)).logits(tokens)
    return ref, out, sharded


FORWARD_CASES = [(name, dict(data=2, fsdp=2, tensor=2), "fsdp") for name in FAMILY_PRESETS] + [
    (name, dict(fsdp=2, expert=4), "expert") for name in MOE_PRESETS
]


@pytest.mark.parametrize("name, sizes, rules", FORWARD_CASES, ids=[f"{n}-{r}" for n, _, r in FORWARD_CASES])
def test_sharded_forward_equals_single_device(name, sizes, rules, monkeypatch):
    calls = []
    real = expert_parallel.dispatch_experts_parallel
    monkeypatch.setattr(expert_parallel, "dispatch_experts_parallel", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, out, sharded = _sharded_case(name, sizes, rules)
    embed = sharded["embed"]["embedding"].get_value()
    assert embed.addressable_shards[0].data.size < embed.size  # the weights really are split
    assert bool(calls) == (rules == "expert")  # MoE layers really ran expert-parallel
    assert out.sharding.spec[0] in (("data", "fsdp"), ("fsdp", "expert"))  # the batch stayed split
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


DECODE_CASES = [
    c
    for c in (
        ("deepseek-v3-tiny", dict(expert=8), 1),
        ("grok-1-tiny", dict(tensor=2, expert=4), 8),
        ("deepseek-v3-tiny", dict(data=2, tensor=4), 4),  # latent-cache decode kernel per (batch, heads) block
        ("grok-1-tiny", dict(data=4, tensor=2), 8),  # tensor-parallel experts: width shards, no expert axis
    )
    if c[0] in MOE_PRESETS
]


@pytest.mark.parametrize(
    "name, sizes, batch", DECODE_CASES, ids=[f"{c[0]}-{'-'.join(map(str, c[1].items()))}" for c in DECODE_CASES]
)
def test_sharded_prefill_and_decode_with_cache_equal_single_device(name, sizes, batch, monkeypatch):
    """The serving layouts of docs/scaling.md on 8 devices: the cached prefill and a decode step
    (a batch of 1 that the 8 token shards must pad; a batch split over expert with the expert width
    over tensor) give the single-device logits, with the layers scanned (shard_map and the
    per-device kernels inside lax.scan)."""
    model, tokens, _ = _reference(name)
    graphdef, module = model.graphdef, model.module
    tokens = tokens[:batch]
    from vishwam_jax.models import mla

    monkeypatch.setattr(mla, "NAIVE_PREFILL_MIN_TOKENS", 4)  # the 6-token prompt enters the cache in the naive form

    def run(p, cache):
        prefill = models.apply(graphdef, p, tokens[:, :6], cache=cache)
        step = models.apply(graphdef, p, tokens[:, 6:7], cache=prefill.cache)
        return prefill.logits, step.logits

    ref = jax.jit(run)(model.params, module.init_cache(batch, 16, jnp.float32))
    mesh = make_mesh(**sizes)
    sharded = jax.device_put(model.params, param_shardings(model.params, mesh, "tensor", model.config))
    with use_mesh(mesh, "tensor"):
        cache = module.init_cache(batch, 16, jnp.float32)
        out = jax.jit(run)(sharded, cache)
        assert _shard_map_inside_scan(jax.make_jaxpr(run)(sharded, cache).jaxpr)  # the MoE stack is scanned
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


# -- restore onto another mesh ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [p for p in ("gemma2-tiny", "grok-1-tiny", "deepseek-v3-tiny") if p in FAMILY_PRESETS])
def test_restore_onto_a_different_mesh(name, tmp_path):
    model, _, _ = _reference(name)  # the forward tests' weights: one init compile per preset
    config, params = model.config, model.params
    save_mesh = make_mesh(fsdp=4, tensor=2)
    saved = jax.device_put(params, param_shardings(params, save_mesh, "fsdp", config))
    orbax_io.save_params(tmp_path / "m", saved, config)

    # Gemma onto a serving mesh; the MoE families onto an expert-parallel one (Grok-1 serving-style).
    load_mesh, rules = {
        "gemma": (make_mesh(data=2, tensor=4), "tensor"),
        "grok1": (make_mesh(tensor=2, expert=4), "tensor"),
    }.get(config.family, (make_mesh(fsdp=2, expert=4), "expert"))
    restored = vj.load(tmp_path / "m", mesh=load_mesh, rules=rules)
    want = param_shardings(abstract_state(orbax_io.read_config(tmp_path / "m")), load_mesh, rules, config)
    flat_want = jax.tree_util.tree_leaves(want)
    flat_got = jax.tree_util.tree_leaves(restored.params)
    flat_ref = jax.tree_util.tree_leaves(params)
    assert len(flat_got) == len(flat_ref) == len(flat_want)
    assert any(len(w.spec) for w in flat_want)  # something is really split on the new mesh
    for got, ref, sharding in zip(flat_got, flat_ref, flat_want):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        for shard in got.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(shard.data, np.asarray(ref)[shard.index])
    chex.assert_trees_all_equal(nnx.to_pure_dict(restored.params), nnx.to_pure_dict(params))


def test_documented_layouts_divide_the_published_shapes():
    """docs/scaling.md's layouts (scripts/scaling_plan.py) shard the 671B / 314B presets with the
    real rule presets: a rule or preset change that breaks them fails here, not on the pod."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "scaling_plan.py"
    spec = importlib.util.spec_from_file_location("scaling_plan", path)
    plan = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scaling_plan", plan)  # dataclasses look their module up there
    spec.loader.exec_module(plan)
    for layout in plan.LAYOUTS:
        config = get_config(layout.preset)
        stats = plan.param_stats(config, layout)  # raises ShardingError if a dimension does not divide
        assert stats.per_device * layout.devices >= stats.total  # every parameter is held somewhere
        table = plan.train_table(layout) if layout.phase == "train" else plan.serve_table(layout)
        assert f"RULES[{layout.rules!r}]" in table


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto", None])
def test_load_onto_a_mesh_from_jax_make_mesh(axis_type, tmp_path):
    """jax.make_mesh's default (Explicit axes in new jax) or Auto axes: the model is placed on the same
    devices by the same rules and computes what one device computes, plain and under use_mesh."""
    kwargs = {} if axis_type is None else {"axis_types": (getattr(jax.sharding.AxisType, axis_type),) * 3}
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), **kwargs)
    tokens = jnp.array([[5, 9, 2, 7, 1, 3, 8, 4]] * 2, jnp.int32)
    single = vj.load("gemma2-tiny")
    sharded = vj.load("gemma2-tiny", mesh=mesh)
    leaf = jax.tree_util.tree_leaves(sharded.params)[0]
    placed = leaf.sharding.mesh
    assert placed.devices.tolist() == mesh.devices.tolist() and placed.axis_names == mesh.axis_names
    np.testing.assert_allclose(sharded.logits(tokens), single.logits(tokens), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sharded.generate(tokens, 4), single.generate(tokens, 4))
    with use_mesh(mesh, "fsdp"):
        np.testing.assert_allclose(sharded.logits(tokens), single.logits(tokens), rtol=1e-5, atol=1e-5)
    # A model directory restored onto the mesh: each device reads its shards.
    orbax_io.save_params(tmp_path / "m", single.params, single.config)
    restored = vj.load(tmp_path / "m", mesh=mesh)
    np.testing.assert_allclose(restored.logits(tokens), single.logits(tokens), rtol=1e-5, atol=1e-5)
