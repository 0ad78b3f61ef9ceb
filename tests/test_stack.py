"""Stacked layers: the scanned and the per-layer-buffer forms (models/stack.py) compute the same
model, and converting between them loses nothing."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import vishwam_jax as vj
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.models import stack

PRESETS = ["gemma2-tiny", "deepseek-v3-tiny", "grok-1-tiny"]


@pytest.mark.parametrize("name", PRESETS)
def test_per_layer_buffers_give_the_scanned_model(name):
    scanned = vj.load(name, unstack_layers=False, seed=1)
    per_layer = vj.load(name, unstack_layers=True, seed=1)
    layers = [
        x
        for x in jax.tree_util.tree_leaves(per_layer.params, is_leaf=lambda x: isinstance(x, stack.Layers))
        if isinstance(x, stack.Layers)
    ]
    assert layers, "no stacked parameter was split into per-layer buffers"
    tokens = np.random.default_rng(0).integers(3, scanned.config.vocab_size, size=(2, 13))
    ref = np.asarray(scanned.logits(tokens))
    np.testing.assert_allclose(per_layer.logits(tokens), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    np.testing.assert_array_equal(per_layer.generate(prompts, 6), scanned.generate(prompts, 6))


def test_unstack_and_restack_round_trip_and_save_stacked(tmp_path):
    model = vj.load("grok-1-tiny", unstack_layers=False)
    split = stack.unstack_layers(model.params)
    restacked = stack.restack_layers(split)
    chex.assert_trees_all_equal(nnx.to_pure_dict(restacked), nnx.to_pure_dict(model.params))
    chex.assert_trees_all_equal_shapes_and_dtypes(nnx.to_pure_dict(restacked), nnx.to_pure_dict(model.params))
    # A model held per layer saves the stacked layout, which loads back into the same parameters.
    orbax_io.save_params(tmp_path / "m", split, model.config)
    back = vj.load(tmp_path / "m", unstack_layers=False)
    chex.assert_trees_all_equal(nnx.to_pure_dict(back.params), nnx.to_pure_dict(model.params))


def test_per_layer_buffers_serve_the_paged_cache_and_speculative_decoding():
    from vishwam_jax.inference.speculative import SpeculativeGenerator

    scanned = vj.load("deepseek-v3-tiny", unstack_layers=False, seed=2)
    per_layer = vj.load("deepseek-v3-tiny", unstack_layers=True, seed=2)
    prompts = [list(range(5, 40)), [7, 8, 9]]
    expected = np.asarray(scanned.generate(prompts, 5))
    np.testing.assert_array_equal(per_layer.generate(prompts, 5, paged_blocks=8), expected)
    result = SpeculativeGenerator(per_layer.graphdef, per_layer.config).generate(per_layer.params, prompts, 5)
    np.testing.assert_array_equal(result.tokens, expected)


@pytest.mark.parametrize(
    "name,sizes,rules",
    [("grok-1-tiny", dict(tensor=2, expert=4), "expert"), ("deepseek-v3-tiny", dict(fsdp=2, expert=4), "expert")],
)
def test_per_layer_buffers_keep_their_shardings_and_serve_under_a_mesh(name, sizes, rules):
    from vishwam_jax.sharding import make_mesh, use_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    single = vj.load(name, unstack_layers=False, seed=4)
    mesh = make_mesh(**sizes)
    model = vj.load(name, mesh=mesh, rules=rules, unstack_layers=True, seed=4)
    experts = model.params["layers" if name.startswith("grok") else "moe_layers"]["experts"]["gate"][
        "kernel"
    ].get_value()
    assert isinstance(experts, stack.Layers)
    assert experts.arrays[0].addressable_shards[0].data.shape[0] < experts.arrays[0].shape[0]  # experts split
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12]] * 8
    with use_mesh(mesh, rules):
        got = np.asarray(model.generate(prompts, 4))
    np.testing.assert_array_equal(got, np.asarray(single.generate(prompts, 4)))
