"""EPLB (sharding/eplb.py, sharding/placement.py): the policy against DeepSeek's published example,
its invariants, the load window, the CLI, and serving a placement with redundant expert slots on 8
simulated devices with logits equal to the placement-free model's."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vishwam_jax as vj
from vishwam_jax.models import moe
from vishwam_jax.sharding import eplb, make_mesh, use_mesh
from vishwam_jax.sharding.eplb import LoadWindow, Placement, PlacementError, rebalance_experts

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="8 devices (CPU: conftest simulates 8)")

# The example of DeepSeek's EPLB README: 2 layers of 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
README_WEIGHT = np.array(
    [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
)
README_PHY2LOG = np.array(
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
)


def _check_consistent(phy2log, log2phy, logcnt, experts):
    layers, slots = phy2log.shape
    for layer in range(layers):
        np.testing.assert_array_equal(logcnt[layer], np.bincount(phy2log[layer], minlength=experts))
        for e in range(experts):
            mine = log2phy[layer, e]
            assert (mine[: logcnt[layer, e]] >= 0).all() and (mine[logcnt[layer, e] :] == -1).all()
            assert (phy2log[layer, mine[: logcnt[layer, e]]] == e).all()
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == slots).all()


def test_reproduces_the_reference_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, README_PHY2LOG)
    assert log2phy.shape == (2, 12, 5)
    _check_consistent(phy2log, log2phy, logcnt, 12)
    # Hierarchical: each node's 8 slots hold whole groups of 3 experts (group-limited routing stays local).
    for row in phy2log:
        for node in (row[:8], row[8:]):
            assert len({e // 3 for e in node}) == 2


def test_global_policy_when_groups_do_not_split_over_nodes():
    """3 groups on 2 nodes: the global policy; deterministic, and lighter than one slot per expert."""
    a = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    b = rebalance_experts(README_WEIGHT.copy(), 16, 3, 2, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    _check_consistent(*a, 12)
    assert not np.array_equal(a[0], README_PHY2LOG)
    loads = eplb.device_loads(README_WEIGHT, a[0], 8)
    assert (loads.max(-1) < README_WEIGHT.max(-1)).all()  # the hottest expert is split


def test_zipf_skew_balances_with_redundant_slots():
    rng = np.random.default_rng(0)
    weight = np.sort(rng.zipf(1.3, (4, 64)).astype(float), axis=-1)[:, ::-1] * 10
    base = eplb.device_loads(weight, np.tile(np.arange(64), (4, 1)), 8)
    before = (base.max(-1) / base.mean(-1)).max()
    after = []
    for extra in (8, 16):
        placement = eplb.placement_from_loads(weight, 64 + extra, 8)
        loads = eplb.device_loads(weight, placement.phy2log, 8)
        after.append((loads.max(-1) / loads.mean(-1)).max())
        np.testing.assert_allclose(loads.sum(-1), weight.sum(-1))  # every token still served
    assert before > 2 and after[1] <= after[0] < before


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(README_WEIGHT, 15, 4, 2, 8)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-README_WEIGHT, 16, 4, 2, 8)
    with pytest.raises(PlacementError, match="without a slot"):
        Placement(np.zeros((1, 4), np.int32), 4)


def test_load_window_keeps_the_last_batches():
    window = LoadWindow.zeros(3, 2, 4)
    for i in range(5):
        window = eplb.record_load(window, jnp.full((2, 4), i + 1, jnp.int32))
    np.testing.assert_array_equal(window.total(), np.full((2, 4), 3 + 4 + 5))
    assert int(window.filled) == 5


def test_cli_writes_a_placement_and_rejects_bad_input(tmp_path, capsys):
    counts = tmp_path / "counts.npz"
    window = eplb.record_load(LoadWindow.zeros(2, 2, 12), jnp.asarray(README_WEIGHT, jnp.int32))
    window.save(counts)  # the file a serving or training loop writes
    out = tmp_path / "placement.json"
    args = [str(counts), "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8", "--out", str(out)]
    assert eplb.main(args) == 0
    assert "max/mean device load" in capsys.readouterr().out
    placement = Placement.load(out)
    np.testing.assert_array_equal(placement.phy2log, README_PHY2LOG)
    assert json.loads(out.read_text())["num_slots"] == 16

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    assert eplb.main([str(bad), "--gpus", "8", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert eplb.main([str(counts), "--replicas", "15", "--gpus", "8", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_slots_route_each_token_to_one_replica():
    """Logical expert 0 has slots 0 and 3: consecutive tokens alternate between them."""
    log2phy = jnp.array([[0, 3], [1, 1], [2, 2]], jnp.int32)
    logcnt = jnp.array([2, 1, 1], jnp.int32)
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0]], jnp.int32)
    np.testing.assert_array_equal(moe.to_slots(experts, log2phy, logcnt), [[0, 1], [3, 2], [0, 1], [1, 3]])


def test_a_hot_expert_splits_evenly_over_its_replicas_and_devices():
    """80% of 64 tokens pick expert 3, which EPLB gives 3+ replicas out of 16 slots on 8 devices: its
    rows split about evenly over the replicas, and the heaviest device carries far less than before."""
    rng = np.random.default_rng(0)
    n = 64
    first = np.where(rng.random(n) < 0.8, 3, rng.integers(0, 8, n))
    second = (first + 1 + rng.integers(0, 7, n)) % 8
    experts = np.stack([first, second], 1).astype(np.int32)
    weight = np.bincount(experts.ravel(), minlength=8)[None].astype(float)
    placement = eplb.placement_from_loads(weight, 16, 8)
    copies = placement.logcnt[0, 3]
    assert copies >= 3
    tables = jnp.asarray(placement.log2phy[0]), jnp.asarray(placement.logcnt[0])
    slots = np.asarray(moe.to_slots(jnp.asarray(experts), *tables))
    assert (placement.phy2log[0][slots] == experts).all()  # every row lands on a copy of its own expert
    hot = np.bincount(slots.ravel(), minlength=16)[placement.log2phy[0, 3, :copies]]
    # Replica = token index mod copies: even up to how the hot tokens fall on the indices.
    assert hot.sum() == (experts == 3).sum() and hot.max() <= 1.25 * hot.mean()
    before = np.bincount(experts.ravel(), minlength=8)  # one expert per device
    after = np.bincount(slots.ravel() // 2, minlength=8)
    assert after.max() / after.mean() < 0.6 * before.max() / before.mean()


def _model_dir(config, path, seed: int = 0):
    """A model directory with random weights drawn on the host: restoring it compiles nothing, where
    a random-weight `load` compiles the whole initializer (tens of seconds on CPU)."""
    from flax import nnx

    from vishwam_jax import models
    from vishwam_jax.checkpoint import orbax_io

    rng = np.random.default_rng(seed)
    _, abstract = nnx.split(models.abstract(config), nnx.Param)

    def draw(leaf):
        if leaf.ndim == 1:  # norm scales and router biases
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])).astype(leaf.dtype)

    pure = jax.tree_util.tree_map(draw, nnx.to_pure_dict(abstract))
    orbax_io.save_params(path, pure, config)
    return path


@needs_8_devices
@pytest.mark.parametrize(
    "name, overrides", [("deepseek-v3-tiny", {"num_layers": 2}), ("grok-1-tiny", {"num_layers": 2, "num_experts": 8})]
)
def test_placed_model_logits_equal_and_placement_changes_without_recompiling(name, overrides, tmp_path):
    """vj.load(dir, mesh=8 devices, expert_placement=FILE) with one redundant slot per device: the
    same logits as the placement-free model, before and after moving to another placement (which
    recompiles nothing)."""
    from vishwam_jax.sharding.placement import current_placement

    config = vj.get_config(name, **overrides)
    model_dir = _model_dir(config, tmp_path / "model")
    layers = 1 if name.startswith("deepseek") else 2
    rng = np.random.default_rng(1)
    weight = rng.zipf(1.4, (layers, config.num_experts)).astype(float)
    slots = config.num_experts + 8
    path = tmp_path / "placement.json"
    eplb.placement_from_loads(weight, slots, 8).save(path)
    mesh = make_mesh(expert=8)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 12)), jnp.int32)
    base = vj.load(model_dir, mesh=mesh, rules="expert")
    placed = vj.load(model_dir, mesh=mesh, rules="expert", expert_placement=path)
    assert placed.config.num_expert_slots == slots
    down = placed.params["moe_layers" if layers == 1 else "layers"]["experts"]["down"]["kernel"].get_value()
    assert down.shape[1] == slots and down.sharding.spec[1] == "expert"  # slots split over the devices

    # Equal to float32 rounding, not bit for bit: a placement regroups each expert's rows in the
    # grouped matmul, and this machine's XLA:CPU was seen to round such blocks 1 ulp apart.
    def assert_same(logits, ref):
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))

    with use_mesh(mesh, "expert"):
        ref = np.asarray(base.logits(tokens))
        assert_same(placed.logits(tokens), ref)
        other = eplb.placement_from_loads(weight[:, ::-1].copy(), slots, 8)
        assert not np.array_equal(other.phy2log, Placement.load(path).phy2log)
        placed.set_expert_placement(other)
        assert_same(placed.logits(tokens), ref)
        assert placed._logits._cache_size() == 1
    np.testing.assert_array_equal(current_placement(placed).phy2log, other.phy2log)
    with pytest.raises(PlacementError, match="slots"):
        placed.set_expert_placement(eplb.placement_from_loads(weight, slots + 8, 8))
