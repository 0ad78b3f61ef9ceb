"""One mesh for every family: mesh building, logical names on every parameter, rule presets, clear
errors for meshes that do not divide a dimension, sharded forwards equal to single-device ones
(fsdp × tensor, and expert-parallel MoE), and restoring a checkpoint onto another mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vishwam_jax as vj
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.model import Model
from vishwam_jax.models import family_module
from vishwam_jax.presets import get_config
from vishwam_jax.sharding import (
    RULES,
    MeshError,
    ShardingError,
    constrain,
    expert_parallel,
    leaf_name,
    logical_axes,
    make_mesh,
    param_shardings,
    param_specs,
    initialize_distributed,
    parse_mesh,
    use_mesh,
    validate,
)

FAMILY_PRESETS = [p for p in ("gemma-tiny", "gemma2-tiny", "gemma3-tiny", "grok-1-tiny", "deepseek-v3-tiny") if p in vj.list_models()]
MOE_PRESETS = [p for p in ("grok-1-tiny", "deepseek-v3-tiny") if p in vj.list_models()]


def small_config(name: str):
    """The preset with two layers (one sliding + one global for Gemma 2/3, one dense + one MoE for
    DeepSeek-V3, no MTP): every kind of layer, at a fraction of the compile time."""
    c = get_config(name)
    c.num_layers = 2
    if c.family == "gemma":
        c.layer_types = ("sliding", "full") if c.sliding_window else ("full", "full")
    if c.family == "deepseek_v3":
        c.num_dense_layers, c.num_mtp_layers = 1, 0
    return c


def _init(config, seed):
    # One compiled init: eagerly, every op of every layer would be compiled on its own (slow).
    return jax.jit(lambda k: family_module(config).init_params(config, k, jnp.float32))(jax.random.key(seed))


def shapes_of(config):
    return jax.eval_shape(lambda k: family_module(config).init_params(config, k, jnp.float32), jax.random.key(0))


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
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
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
def test_every_large_parameter_is_named_and_sharded_for_training(name):
    """Under RULES["fsdp"] on fsdp=2 × tensor=2 every matrix except the routers is split somewhere:
    a parameter the name table misses would silently be replicated on every device."""
    config = get_config(name)
    shapes = shapes_of(config)
    names = logical_axes(config, shapes)
    specs = param_specs(config, shapes, make_mesh(data=2, fsdp=2, tensor=2), "fsdp")
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_names = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(flat_names) == len(flat_specs)
    for (path, leaf), leaf_names, spec in zip(flat, flat_names, flat_specs):
        assert len(leaf_names) == leaf.ndim
        if leaf.ndim >= 2 and "router" not in leaf_name(path):
            assert any(spec), f"{leaf_name(path)} {leaf.shape} {leaf_names} is replicated under fsdp"
    assert flat_names[[leaf_name(p) for p, _ in flat].index("embed")] == ("vocab", "embed")


def test_family_specific_names():
    if "deepseek-v3-tiny" in FAMILY_PRESETS:
        names = logical_axes(get_config("deepseek-v3-tiny"), shapes_of(get_config("deepseek-v3-tiny")))
        moe_layer = names["layers"][1]
        assert moe_layer["experts"]["down"] == ("experts", "expert_mlp", "embed")
        assert moe_layer["attn"]["wkv_a"] == ("embed", "kv_lora")
        assert moe_layer["attn"]["wq_b"] == ("q_lora", "heads", "head_dim")
        assert moe_layer["shared"]["gate"] == ("embed", "mlp")
        assert names["lm_head"] == ("embed", "vocab")
    if "grok-1-tiny" in FAMILY_PRESETS:
        names = logical_axes(get_config("grok-1-tiny"), shapes_of(get_config("grok-1-tiny")))
        assert names["layers"][0]["moe"]["gate"] == ("experts", "embed", "expert_mlp")
        assert names["layers"][0]["router"] == ("embed", "router_experts")
    names = logical_axes(get_config("gemma2-tiny"), shapes_of(get_config("gemma2-tiny")))
    assert names["layers"][0]["attn"]["k"] == ("embed", "kv_heads", "head_dim")
    assert names["layers"][0]["attn"]["o"] == ("heads", "head_dim", "embed")


def test_int8_leaves_shard_like_their_weight_with_whole_scale_axes():
    config = get_config("grok-1-tiny") if "grok-1-tiny" in FAMILY_PRESETS else get_config("gemma-tiny")
    e, d, f = 4, config.d_model, 48
    shapes = {"layers": [{"moe": {"down": {"int8": jax.ShapeDtypeStruct((e, f, d), jnp.int8), "scale": jax.ShapeDtypeStruct((e, 1, d), jnp.float32)}}}]}
    specs = param_specs(config, shapes, make_mesh(fsdp=2, tensor=2, expert=2), "expert")
    down = specs["layers"][0]["moe"]["down"]
    assert down["int8"] == P("expert", "tensor", "fsdp")
    assert down["scale"] == P("expert", None, "fsdp")


def test_presets_place_weights_as_documented():
    config = small_config("gemma2-tiny")
    shapes = shapes_of(config)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    q = lambda rules: param_specs(config, shapes, mesh, rules)["layers"][0]["attn"]["q"]
    assert q("fsdp") == P("fsdp", "tensor")  # [embed, heads, head_dim]
    assert q("tensor") == P(None, "tensor")  # serving: resident, heads split
    assert q("single") == P()
    assert param_specs(config, shapes, mesh, "fsdp")["embed"] == P("tensor", "fsdp")
    # expert preset: the expert axis is data-parallel outside MoE layers, so dense weights shard over it too.
    assert param_specs(config, shapes, make_mesh(fsdp=2, expert=4), "expert")["layers"][0]["attn"]["q"] == P(("fsdp", "expert"))
    # MQA: one KV head is replicated over tensor rather than rejected.
    mqa = small_config("gemma-tiny")
    assert param_specs(mqa, shapes_of(mqa), mesh, "fsdp")["layers"][0]["attn"]["k"] == P("fsdp")


def test_mesh_that_does_not_divide_a_dimension_names_it():
    config = small_config("gemma2-tiny")  # 4 heads, 2 KV heads, d_model 64
    shapes = shapes_of(config)
    bad = make_mesh(tensor=3, devices=jax.devices()[:3])
    with pytest.raises(ShardingError) as err:
        validate(config, shapes, bad, "tensor")
    msg = str(err.value)
    assert "tensor=3 does not divide num_kv_heads=2 (parameter layers.0.attn.k" in msg
    assert "tensor=3 does not divide num_heads=4 (parameter layers.0.attn.q" in msg
    with pytest.raises(ShardingError, match=r"fsdp=3 does not divide d_model=64 \(parameter embed"):
        param_shardings(config, shapes, make_mesh(fsdp=3, devices=jax.devices()[:3]), "fsdp")
    if MOE_PRESETS:
        moe_config = small_config(MOE_PRESETS[0])
        with pytest.raises(ShardingError, match=f"expert=3 does not divide num_experts={moe_config.num_experts}"):
            validate(moe_config, shapes_of(moe_config), make_mesh(expert=3, devices=jax.devices()[:3]))
    with pytest.raises(ShardingError, match="tensor=3 does not divide"):
        vj.load("gemma2-tiny", mesh=bad, rules="tensor")
    validate(config, shapes, make_mesh(fsdp=2, tensor=2, data=2), "fsdp")  # a good mesh passes


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
@functools.lru_cache(maxsize=None)
def _reference(name):
    """(config, params, tokens, single-device logits), shared by the cases of one preset."""
    config = small_config(name)
    params = _init(config, 1)
    tokens = _tokens(config)
    return config, params, tokens, Model(config, params).logits(tokens)


def _sharded_case(name, sizes, rules):
    config, params, tokens, ref = _reference(name)
    mesh = make_mesh(**sizes)
    sharded = jax.device_put(params, param_shardings(config, params, mesh, rules))
    with use_mesh(mesh, rules):
        out = Model(config, sharded).logits(tokens)
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
    embed = sharded["embed"]
    assert embed.addressable_shards[0].data.size < embed.size  # the weights really are split
    assert bool(calls) == (rules == "expert")  # MoE layers really ran expert-parallel
    assert out.sharding.spec[0] in (("data", "fsdp"), ("fsdp", "expert"))  # the batch stayed split
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


DECODE_CASES = [
    c for c in (
        ("deepseek-v3-tiny", dict(expert=8), 1),
        ("grok-1-tiny", dict(tensor=2, expert=4), 8),
        ("deepseek-v3-tiny", dict(data=2, tensor=4), 4),  # latent-cache decode kernel per (batch, heads) block
        ("grok-1-tiny", dict(data=4, tensor=2), 8),  # tensor-parallel experts: width shards, no expert axis
    )
    if c[0] in MOE_PRESETS
]


@pytest.mark.parametrize("name, sizes, batch", DECODE_CASES, ids=[f"{c[0]}-{'-'.join(map(str, c[1].items()))}" for c in DECODE_CASES])
def test_sharded_prefill_and_decode_with_cache_equal_single_device(name, sizes, batch, monkeypatch):
    """The serving layouts of docs/scaling.md on 8 devices: the cached prefill and a decode step
    (a batch of 1 that the 8 token shards must pad; a batch split over expert with the expert width
    over tensor) give the single-device logits."""
    config, params, tokens, _ = _reference(name)
    family = family_module(config)
    tokens = tokens[:batch]
    from vishwam_jax.models import mla

    monkeypatch.setattr(mla, "NAIVE_PREFILL_MIN_TOKENS", 4)  # the 6-token prompt enters the cache in the naive form

    def run(p, cache):
        prefill, cache = family.forward(p, tokens[:, :6], config, cache=cache)
        step, cache = family.forward(p, tokens[:, 6:7], config, cache=cache)
        return prefill, step

    ref = jax.jit(run)(params, family.init_cache(config, batch, 16))
    mesh = make_mesh(**sizes)
    sharded = jax.device_put(params, param_shardings(config, params, mesh, "tensor"))
    with use_mesh(mesh, "tensor"):
        out = jax.jit(run)(sharded, family.init_cache(config, batch, 16))
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


# -- restore onto another mesh ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [p for p in ("gemma2-tiny", "grok-1-tiny", "deepseek-v3-tiny") if p in FAMILY_PRESETS])
def test_restore_onto_a_different_mesh(name, tmp_path):
    config, params, _, _ = _reference(name)  # the forward tests' weights: one init compile per preset
    save_mesh = make_mesh(fsdp=4, tensor=2)
    saved = jax.device_put(params, param_shardings(config, params, save_mesh, "fsdp"))
    orbax_io.save_params(tmp_path / "m", saved, config)

    # Gemma onto a serving mesh; the MoE families onto an expert-parallel one (Grok-1 serving-style).
    load_mesh, rules = {
        "gemma": (make_mesh(data=2, tensor=4), "tensor"),
        "grok1": (make_mesh(tensor=2, expert=4), "tensor"),
    }.get(config.family, (make_mesh(fsdp=2, expert=4), "expert"))
    model = vj.load(tmp_path / "m", mesh=load_mesh, rules=rules)
    want = param_shardings(config, orbax_io.param_shapes(tmp_path / "m"), load_mesh, rules)
    flat_want = jax.tree_util.tree_leaves(want)
    flat_got = jax.tree_util.tree_leaves(model.params)
    flat_ref = jax.tree_util.tree_leaves(params)
    assert len(flat_got) == len(flat_ref)
    assert any(len(w.spec) for w in flat_want)  # something is really split on the new mesh
    for got, ref, sharding in zip(flat_got, flat_ref, flat_want):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        for shard in got.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(shard.data, np.asarray(ref)[shard.index])


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
