"""Expert parallelism (sharding/expert_parallel.py) against the single-device dispatch of
models/moe.py: skewed routing (one expert gets most tokens, some get none), every token on one
expert, int8 experts, token counts the mesh does not divide, MoE width split over tensor,
gradients, and the opt-in capacity limit dropping exactly the overflow rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vishwam_jax.models import moe
from vishwam_jax.quantization import Quantization, QuantizedWeight
from vishwam_jax.sharding import ShardingError, expert_parallel, make_mesh, use_mesh

E, D, F, K = 8, 16, 32, 2


needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="meshes of up to 8 devices (CPU: conftest simulates 8; run on accelerators with 8)"
)


def _expert_params(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "gate": jax.random.normal(k1, (E, D, F)) / 4,
        "up": jax.random.normal(k2, (E, D, F)) / 4,
        "down": jax.random.normal(k3, (E, F, D)) / 6,
    }


def _skewed(n: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """~80% of the tokens pick expert 3; experts 5, 6, 7 receive nothing."""
    rng = np.random.default_rng(seed)
    first = np.where(rng.random(n) < 0.8, 3, rng.integers(0, 5, n))
    second = np.where(rng.random(n) < 0.8, (first + 1) % 5, rng.integers(0, 5, n))
    second = np.where(second == first, (first + 2) % 5, second)
    experts = np.stack([first, second], axis=1).astype(np.int32)
    x = rng.standard_normal((n, D)).astype(np.float32)
    gates = rng.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(gates), jnp.asarray(experts)


def _dispatch(x, gates, experts, params):
    return jax.jit(lambda *a: moe.dispatch_experts(*a, "silu", E))(x, gates, experts, params)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the expert-parallel path, so a test cannot pass by silently running locally."""
    calls = []
    real = expert_parallel.dispatch_experts_parallel

    def wrapped(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(expert_parallel, "dispatch_experts_parallel", wrapped)
    return calls


@pytest.mark.parametrize(
    "sizes, rules",
    [
        (dict(fsdp=2, expert=4), "expert"),  # 2 experts per device, tokens over fsdp × expert
        (dict(data=2, tensor=2, expert=2), "expert"),  # expert width split over tensor: partial sums
        (dict(expert=8), "tensor"),  # one expert per device
    ],
)
@needs_8_devices
def test_skewed_routing_equals_single_device(sizes, rules, spy):
    params = _expert_params()
    x, gates, experts = _skewed(64)
    ref, ref_counts = _dispatch(x, gates, experts, params)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    assert counts[3] > 0.6 * len(x) and (counts[5:] == 0).all()  # the skew the test is about
    mesh = make_mesh(**sizes)
    with use_mesh(mesh, rules):
        out, out_counts = _dispatch(x, gates, experts, params)
    assert len(spy) == 1
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_counts, ref_counts)


@needs_8_devices
@pytest.mark.parametrize("micro, tokens, exchanges", [(2, 64, 4), (3, 48, 6), (3, 64, 2)])
def test_micro_batches_split_the_exchange_and_keep_the_result(micro, tokens, exchanges, spy):
    """Each device's tokens in `micro` independent dispatches (issue 17's overlap: on GPUs one
    micro-batch's all-to-all can run beside another's experts): the single-device result, with
    `micro` times the forward and reverse exchanges in the program; 64 tokens on 8 devices do not
    split in 3, so that case runs whole."""
    params = _expert_params()
    x, gates, experts = _skewed(tokens)
    ref, _ = _dispatch(x, gates, experts, params)
    with use_mesh(make_mesh(expert=8), "tensor", moe_micro_batches=micro):
        fn = jax.jit(lambda *a: moe.dispatch_experts(*a, "silu", E))
        out, _ = fn(x, gates, experts, params)
        hlo = fn.lower(x, gates, experts, params).as_text()
    assert spy
    assert hlo.count("all_to_all") == exchanges, hlo.count("all_to_all")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="moe_micro_batches"), use_mesh(make_mesh(expert=8), moe_micro_batches=0):
        pass


@needs_8_devices
@pytest.mark.parametrize(
    "sizes", [dict(fsdp=2, expert=4), dict(expert=8)], ids=["2-experts-per-device", "1-expert-per-device"]
)
def test_every_token_on_one_expert_drops_nothing(sizes, spy):
    """The worst case of a capacity-free exchange: every device sends all the rows it can to one
    device (with one expert per device, k=2 distinct experts put one row per token on each of two
    devices: exactly the n_local * min(k, E/ep) rows the buffers are sized for)."""
    params = _expert_params(1)
    x, gates, _ = _skewed(48, seed=1)
    experts = jnp.stack([jnp.full((48,), 6, jnp.int32), jnp.full((48,), 7, jnp.int32)], axis=1)
    ref, _ = _dispatch(x, gates, experts, params)
    with use_mesh(make_mesh(**sizes)):
        out, _ = _dispatch(x, gates, experts, params)
    assert spy
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@needs_8_devices
def test_int8_experts_and_token_count_not_divisible(spy):
    """int8 weights with [e, 1, f] scales (the scale's size-1 axis must stay whole), and 61 tokens
    over 8 token shards (padded inside, sliced off after)."""
    params = _expert_params(2)
    quantized = {}
    for name, w in params.items():
        scale = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127.0
        quantized[name] = QuantizedWeight(jnp.round(w / scale).astype(jnp.int8), scale, "int8", (1, 1))
    x, gates, experts = _skewed(61, seed=2)
    ref, _ = _dispatch(x, gates, experts, quantized)
    with use_mesh(make_mesh(data=2, tensor=2, expert=2)):
        out, counts = _dispatch(x, gates, experts, quantized)
    assert out.shape == (61, D) and int(counts.sum()) == 61 * K
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@needs_8_devices
def test_gradients_equal_single_device(spy):
    params = _expert_params(3)
    x, gates, experts = _skewed(32, seed=3)

    def loss(p, x, g):
        y, _ = moe.dispatch_experts(x, g, experts, p, "silu", E)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    ref = grad(params, x, gates)
    with use_mesh(make_mesh(fsdp=2, expert=4)):
        out = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, gates)
    assert spy
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@needs_8_devices
def test_capacity_factor_drops_exactly_the_overflow():
    """With a capacity, each (source device, destination device) block keeps its first `cap` rows
    in expert order; the result must equal the local dispatch with the dropped pairs' gates zeroed."""
    ep, n = 4, 64
    params = _expert_params(4)
    x, gates, experts = _skewed(n, seed=4)
    factor = 1.0
    n_local = n // ep  # mesh expert=4 only: each expert-axis device holds a contiguous quarter
    cap = int(np.ceil(factor * n_local * K / ep))
    keep = np.ones((n, K), bool)
    ex = np.asarray(experts)
    for s in range(ep):
        rows = ex[s * n_local : (s + 1) * n_local].reshape(-1)
        order = np.argsort(rows, kind="stable")
        dest = rows[order] // (E // ep)
        slot = np.arange(len(rows)) - np.searchsorted(dest, dest, side="left")
        dropped = order[slot >= cap]
        keep[s * n_local + dropped // K, dropped % K] = False
    assert 0 < (~keep).sum() < keep.size  # the skew overflows some blocks, not all
    ref, _ = _dispatch(x, gates * keep, experts, params)
    devices = jax.devices()[:ep]
    with use_mesh(make_mesh(expert=ep, devices=devices), "expert", moe_capacity_factor=factor):
        out, _ = _dispatch(x, gates, experts, params)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    exact, _ = _dispatch(x, gates, experts, params)
    assert not np.allclose(out, exact, atol=1e-3)  # something was really dropped


@needs_8_devices
def test_experts_must_split_evenly():
    params = _expert_params()
    x, gates, experts = _skewed(24)
    with use_mesh(make_mesh(expert=3, devices=jax.devices()[:3])):
        with pytest.raises(ShardingError, match="expert=3 does not divide num_experts=8"):
            _dispatch(x, gates, experts, params)


def test_exchange_method_auto_is_dense_off_tpu():
    """GPU and CPU exchange densely by default (on GPUs NCCL's all-to-all measured faster than XLA's
    ragged kernel); an explicit choice is kept."""
    mesh = make_mesh(expert=2, devices=jax.devices()[:2])
    with use_mesh(mesh) as active:
        assert expert_parallel._exchange_method(active) == ("ragged" if jax.default_backend() == "tpu" else "dense")
    with use_mesh(mesh, moe_all_to_all="ragged") as active:
        assert expert_parallel._exchange_method(active) == "ragged"


@pytest.mark.skipif(
    jax.default_backend() == "cpu" or jax.device_count() < 2,
    reason="XLA:CPU has no ragged all-to-all; needs 2+ accelerators",
)
def test_ragged_exchange_equals_dense_exchange(spy):
    ep = 2 if jax.device_count() < 4 else 4
    params = _expert_params(5)
    x, gates, experts = _skewed(64, seed=5)
    ref, _ = _dispatch(x, gates, experts, params)
    mesh = make_mesh(expert=ep, devices=jax.devices()[:ep])
    outs = {}
    for method in ("ragged", "dense"):
        with use_mesh(mesh, moe_all_to_all=method):
            outs[method], _ = _dispatch(x, gates, experts, params)
    np.testing.assert_allclose(outs["ragged"], ref, rtol=2e-2, atol=2e-2)  # GPU matmul precision
    np.testing.assert_allclose(outs["ragged"], outs["dense"], rtol=1e-5, atol=1e-5)


@needs_8_devices
@pytest.mark.parametrize(
    "sizes, n", [(dict(tensor=8), 1), (dict(data=2, tensor=4), 64)], ids=["decode-batch-1", "tokens-over-data"]
)
@pytest.mark.parametrize("int8", [False, True])
def test_tensor_parallel_experts_run_on_width_shards(sizes, n, int8, monkeypatch):
    """No expert axis, width split over tensor (Grok-1 served tensor-parallel): each device runs its
    width shard and the outputs are summed, so the weights are never gathered (left to GSPMD, the
    Pallas grouped matmul, which it cannot partition, would get them all-gathered on every call)."""
    from vishwam_jax.sharding import logical_axes, param_shardings

    calls = []
    real = expert_parallel.dispatch_experts_width_parallel
    monkeypatch.setattr(expert_parallel, "dispatch_experts_width_parallel", lambda *a: calls.append(1) or real(*a))
    params = _expert_params(3)
    if int8:  # stored K-major, as the Experts module stores quantized weights: [e, out, in]
        params = {
            name: QuantizedWeight(
                jnp.clip(jnp.round(w.swapaxes(1, 2) * 60), -127, 127).astype(jnp.int8),
                jnp.full((E, w.shape[2], 1), 1 / 60, jnp.float32),
                "int8",
                (1, 1),
                k_major=True,
            )
            for name, w in params.items()
        }
    x, gates, experts = _skewed(n, seed=3)
    ref, ref_counts = _dispatch(x, gates, experts, params)
    # The weights as the Experts module's Params: placed by their own logical axes, which are the
    # layout the shard_map blocks of the dispatch assume.
    quantization = Quantization("int8") if int8 else None
    graphdef, state = nnx.split(moe.Experts(E, D, F, "silu", rngs=nnx.Rngs(0), quantization=quantization), nnx.Param)
    for name, axes in nnx.to_pure_dict(logical_axes(state)).items():
        e_, a_, b_ = expert_parallel.WEIGHT_AXES[name]
        assert axes == {leaf: (e_, b_, a_) if int8 else (e_, a_, b_) for leaf in axes}
    nnx.replace_by_pure_dict(
        state,
        {name: {"kernel": w.values, "kernel_scale": w.scale} if int8 else {"kernel": w} for name, w in params.items()},
    )
    mesh = make_mesh(**sizes)
    with use_mesh(mesh, "tensor"):
        placed = jax.device_put(state, param_shardings(state, mesh, "tensor"))
        width = 2 if int8 else 1  # down [e, f, d]; K-major [e, d, f]
        assert placed["down"]["kernel"].get_value().sharding.spec[width] == "tensor"  # the width really is split
        fn = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
        out, counts = fn(placed, x, gates, experts)
        hlo = fn.lower(placed, x, gates, experts).compile().as_text()
    assert calls, "the width-parallel path was not taken"
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, ref_counts)
    assert "all-gather" not in hlo  # the only collective is the output's all-reduce
    assert "all-reduce" in hlo
