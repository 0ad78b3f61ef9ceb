"""FP8 training GEMMs (DeepSeek-V3's tile-wise recipe): the tiles and blocks, forward and both
gradients of the dense and grouped products against the recipe written out, on sizes that are not
multiples of 128 with uneven and empty groups, and a train step that uses them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vishwam_jax import models
from vishwam_jax.pallas_kernels.grouped_matmul import gmm_reference
from vishwam_jax.presets import get_config
from vishwam_jax.quantization.fp8_training import as_fp8, fp8_grouped_matmul, fp8_matmul, fp8_matmuls
from vishwam_jax.training.optimizer import make_optimizer
from vishwam_jax.training.step import StepConfig, init_state, make_train_step

E4M3_MAX = 448.0


def _normal(seed: int, shape, scale: float = 1.0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def test_tiles_scale_each_128_values_on_their_own():
    x = np.array(_normal(0, (3, 300)))
    x[1, 5] = 1e5  # an outlier in row 1's first tile only: the rest of that tile drops to subnormals
    q = np.asarray(as_fp8(jnp.asarray(x), (1, 128)))
    # Every tile's largest magnitude comes back (it maps to e4m3's 448; the scale rounds in float32).
    for row in range(3):
        for start in (0, 128, 256):
            tile = slice(start, min(start + 128, 300))
            i = np.argmax(np.abs(x[row, tile]))
            np.testing.assert_allclose(q[row, tile][i], x[row, tile][i], rtol=1e-6)
    # The outlier coarsens its own tile only: the other tiles of its row keep e4m3's relative precision.
    rel = np.abs(q - x) / np.maximum(np.abs(x), 1e-3)
    assert rel[1, 128:][np.abs(x[1, 128:]) > 0.1].max() < 2**-3
    assert np.median(rel[1, :128]) > 0.1 > 2**-4 > np.median(rel[0, :128])
    # Blocks: one scale per 128 x 128 of the matrix, per leading (expert) index.
    w = np.array(_normal(1, (2, 130, 140)))
    w[0, 129, 139] = 500.0
    qw = np.asarray(as_fp8(jnp.asarray(w), (128, 128)))
    assert abs(qw[0, 129, 139] - 500.0) < 1e-3 and np.abs(qw[1] - w[1]).max() < np.abs(w[1]).max() / 8


def test_fp8_matmul_and_its_gradients_follow_the_recipe():
    x, w = _normal(0, (37, 200)), _normal(1, (200, 150), 0.05)
    dy = _normal(2, (37, 150))
    y, pullback = jax.vjp(fp8_matmul, x, w)
    dx, dw = pullback(dy)

    def q(a, tile):
        return np.asarray(as_fp8(a, tile), np.float64)

    np.testing.assert_allclose(y, q(x, (1, 128)) @ q(w, (128, 128)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, q(dy, (1, 128)) @ q(w, (128, 128)).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, q(x, (128, 1)).T @ q(dy, (128, 1)), rtol=1e-5, atol=1e-4)
    # ... and stay near the float product (e4m3 keeps 3 mantissa bits; errors average out in the sums)
    exact, exact_pullback = jax.vjp(jnp.dot, x, w)
    for got, want in zip((y, dx, dw), (exact, *exact_pullback(dy))):
        assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 0.1


@pytest.mark.parametrize("group_sizes", [(5, 0, 40, 3), (0, 0, 48, 0)])
def test_fp8_grouped_matmul_equals_the_recipe_per_group(group_sizes):
    sizes = jnp.asarray(group_sizes, jnp.int32)
    x, w = _normal(3, (50, 130)), _normal(4, (4, 130, 70), 0.1)  # 2 rows past the groups
    dy = _normal(5, (50, 70))
    y, pullback = jax.vjp(lambda x, w: fp8_grouped_matmul(x, w, sizes), x, w)
    dx, dw = pullback(dy)
    xq, wq = as_fp8(x, (1, 128)), as_fp8(w, (128, 128))
    np.testing.assert_allclose(y, gmm_reference(xq, wq, sizes), rtol=1e-5, atol=1e-5)
    dyq = as_fp8(dy, (1, 128))
    np.testing.assert_allclose(dx, gmm_reference(dyq, jnp.swapaxes(wq, 1, 2), sizes), rtol=1e-5, atol=1e-5)
    xt, dyt = np.asarray(as_fp8(x, (128, 1))), np.asarray(as_fp8(dy, (128, 1)))
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    for g in range(4):
        rows = slice(bounds[g], bounds[g + 1])
        np.testing.assert_allclose(dw[g], xt[rows].T @ dyt[rows], rtol=1e-5, atol=1e-5)  # empty: zeros


def test_fp8_products_on_the_gpu_kernel_equal_the_recipe(monkeypatch):
    """With the GPU kernel's backend (interpret mode), the forward and dgrad products of the dense and
    grouped FP8 GEMMs are the float8 tensor-core kernel's, and equal the recipe's float32 products."""
    x, w, dy = _normal(0, (37, 200)), _normal(1, (200, 150), 0.05), _normal(2, (37, 150))
    sizes = jnp.asarray((5, 0, 30, 2), jnp.int32)
    wg = _normal(4, (4, 200, 150), 0.05)
    want = {}
    for impl in ("xla", "pallas_interpret"):
        monkeypatch.setenv("VISHWAM_GMM_IMPL", impl)
        y, pullback = jax.vjp(fp8_matmul, x, w)
        yg, pullback_g = jax.vjp(lambda x, w: fp8_grouped_matmul(x, w, sizes), x, wg)
        got = (y, *pullback(dy), yg, *pullback_g(dy))
        if impl == "xla":
            want = got
            continue
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_fp8_weights_reach_the_kernel_k_major(monkeypatch):
    """FP8 wgmma reads both operands K-major: the forward and the dgrad, dense and grouped, hand the
    kernel a weight whose contracted axis is last (a [k, n] weight would be loaded and transposed
    synchronously at every K step)."""
    from vishwam_jax.pallas_kernels import grouped_matmul

    layouts, original = [], grouped_matmul.gmm_fp8

    def recording(*args, **kwargs):
        layouts.append(kwargs.get("transpose_rhs", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(grouped_matmul, "gmm_fp8", recording)
    x, w, dy = _normal(0, (37, 200)), _normal(1, (200, 150), 0.05), _normal(2, (37, 150))
    sizes = jnp.asarray((5, 0, 30, 2), jnp.int32)
    jax.vjp(fp8_matmul, x, w)[1](dy)
    jax.vjp(lambda x, w: fp8_grouped_matmul(x, w, sizes), x, _normal(4, (4, 200, 150), 0.05))[1](dy)
    assert len(layouts) == 4 and all(layouts)


@pytest.mark.parametrize("name", ["deepseek-v3-tiny", "gemma-tiny"])
def test_fp8_train_step_runs_fp8_gemms_and_stays_near_bf16(name):
    config = get_config(name, num_layers=2, **({"num_dense_layers": 1} if name == "deepseek-v3-tiny" else {}))
    module = models.build(config, rngs=nnx.Rngs(0))
    params = nnx.state(module, nnx.Param)
    optimizer = make_optimizer(1e-3, 10, warmup_steps=0)
    batch = jax.random.randint(jax.random.key(0), (1, 4, 65), 3, config.vocab_size)
    losses = {}
    for fp8 in (False, True):
        step = make_train_step(module, optimizer, StepConfig(compute_dtype=jnp.bfloat16, fp8=fp8))
        state = init_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        if fp8:  # the FP8 products are in the compiled step
            assert "f8e4m3fn" in step.lower(state, None, batch).as_text().lower()
        losses[fp8] = []
        for _ in range(4):
            state, metrics = step(state, None, batch)
            losses[fp8].append(float(metrics["loss"]))
    assert losses[True] != losses[False]
    np.testing.assert_allclose(losses[True], losses[False], rtol=0.02)
    assert losses[True][-1] < losses[True][0]


def test_fp8_matmuls_is_scoped_to_its_block():
    from vishwam_jax.quantization.fp8_training import fp8_active

    assert not fp8_active()
    with fp8_matmuls():
        assert fp8_active()
    assert not fp8_active()
