"""Grouped matmul: the Pallas GPU kernel (interpret mode), the TPU kernel (interpret mode), the XLA
path and the gradients, all against the plain-jnp reference on small awkward shapes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam_jax.pallas_kernels import _gmm_gpu, grouped_matmul

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
# A block config small enough that the tiny test shapes span several row tiles, N blocks, K steps
# and work-item bands: the kernel's loops and masks are exercised, not just one block.
TINY = _gmm_gpu.BlockConfig(bm=16, bn=16, bk=16, band=2)
TINY_ALIGNED = _gmm_gpu.BlockConfig(bm=16, bn=16, bk=16, band=2, group_aligned=True)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(grouped_matmul.ENV_VAR, raising=False)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite output (unwritten rows?)"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make(m, k, n, sizes, dtype=jnp.float32, transpose=False, int8=False, seed=0):
    rng = np.random.default_rng(seed)
    g = len(sizes)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    shape = (g, n, k) if transpose else (g, k, n)
    if int8:
        rhs = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
        scale = jnp.asarray(rng.uniform(0.005, 0.02, (g, n, 1) if transpose else (g, 1, n)), jnp.float32)
    else:
        rhs = jnp.asarray(rng.standard_normal(shape) / np.sqrt(k), dtype)
        scale = None
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), scale


def numpy_gmm(lhs, rhs, sizes, transpose=False, scale=None):
    """Independent float64 oracle for the reference itself."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    if transpose:
        rhs = rhs.transpose(0, 2, 1)
    if scale is not None:
        rhs = rhs * np.asarray(scale, np.float64).reshape(rhs.shape[0], 1, rhs.shape[2])
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for gi, size in enumerate(np.asarray(sizes)):
        out[start : start + size] = lhs[start : start + size] @ rhs[gi]
        start += size
    return out


# (m, k, n, group sizes): each exercises one awkward case
SHAPES = {
    "uneven_empty_first_last_short_sum": (50, 40, 24, [0, 7, 0, 20, 13, 0]),
    "all_groups_in_one_block": (12, 24, 20, [3, 0, 4, 5]),
    "one_group_holds_all": (37, 24, 20, [0, 37, 0]),
    "m_not_block_multiple_ragged_k_n": (45, 33, 17, [9, 1, 16, 2, 17]),
}


def test_reference_matches_numpy():
    for name, (m, k, n, sizes) in SHAPES.items():
        for transpose in (False, True) if name == "uneven_empty_first_last_short_sum" else (False,):
            lhs, rhs, gs, _ = make(m, k, n, sizes, transpose=transpose)
            ref = grouped_matmul.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose)
            assert rel_err(ref, numpy_gmm(lhs, rhs, sizes, transpose)) < 1e-6, name
    lhs, rhs, gs, scale = make(30, 24, 20, [10, 0, 15, 5], int8=True)
    ref = grouped_matmul.gmm_reference(lhs, rhs, gs, rhs_scale=scale)
    assert rel_err(ref, numpy_gmm(lhs, rhs, [10, 0, 15, 5], scale=scale)) < 1e-6


def _reversed_work_items(group_sizes, m, bm):
    """The live work items in reverse order. On a GPU the visits of one row tile run concurrently in
    any order; interpret mode runs them in grid order, so a visit that stores a row it does not own
    is only exposed when a neighbouring visit no longer overwrites it afterwards."""
    group_ids, tile_ids, starts, ends, count = _ORIGINAL_MAKE_WORK_ITEMS(group_sizes, m, bm)
    w = jnp.arange(group_ids.shape[0])
    src = jnp.where(w < count[0], count[0] - 1 - w, w)
    return group_ids[src], tile_ids[src], starts, ends, count


_ORIGINAL_MAKE_WORK_ITEMS = _gmm_gpu.make_work_items


@pytest.mark.parametrize("order", ["forward", "reversed", "group_aligned"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_pallas_interpret_matches_reference(name, order, monkeypatch):
    if order == "reversed":
        monkeypatch.setattr(_gmm_gpu, "make_work_items", _reversed_work_items)
    m, k, n, sizes = SHAPES[name]
    lhs, rhs, gs, _ = make(m, k, n, sizes, seed=len(name))
    out = _gmm_gpu.gmm(lhs, rhs, gs, config=TINY_ALIGNED if order == "group_aligned" else TINY, interpret=True)
    ref = grouped_matmul.gmm_reference(lhs, rhs, gs)
    assert rel_err(out, ref) < TOL[jnp.dtype(jnp.float32)]
    past = int(np.sum(sizes))
    np.testing.assert_array_equal(np.asarray(out[past:]), 0.0)  # rows past the groups are exactly zero


def _fp8_weights(g, k, n, block, transpose, seed):
    from vishwam_jax.quantization import quantize

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((g, n, k) if transpose else (g, k, n)).astype(np.float32)
    values, scale = quantize(w, "fp8", (1, 1), block, xp=np)
    return jnp.asarray(values), jnp.asarray(scale)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("config", [TINY, TINY_ALIGNED, None], ids=["tiny", "tiny_aligned", "default"])
def test_block_scaled_fp8_kernel_interpret(transpose, config):
    """The fp8 kernel (interpret mode) on awkward shapes: partial edge blocks on both sides, uneven and
    empty groups, rows past the groups; weight-only against the reference on the same float8 weights,
    and float8 activations (1 x b_k tiles) against the dequantized product."""
    from vishwam_jax.quantization import quantize

    for (m, k, n, sizes), block in (
        (SHAPES["uneven_empty_first_last_short_sum"], (32, 16)),
        ((45, 70, 33, [9, 1, 16, 2, 17]), (16, 32)),
    ):
        values, scale = _fp8_weights(len(sizes), k, n, block, transpose, seed=m)
        lhs = jnp.asarray(np.random.default_rng(k).standard_normal((m, k)), jnp.float32)
        gs = jnp.asarray(sizes, jnp.int32)
        want = grouped_matmul.gmm_reference(
            lhs, values, gs, transpose_rhs=transpose, rhs_scale=scale, rhs_scale_block=block
        )
        got = _gmm_gpu.gmm_block_scaled(
            lhs, values, gs, scale, block=block, transpose_rhs=transpose, config=config, interpret=True
        )
        assert rel_err(got, want) < 1e-5
        np.testing.assert_array_equal(np.asarray(got[sum(sizes) :]), 0.0)
        block_k = block[1] if transpose else block[0]
        lhs8, lhs_scale = quantize(lhs, "fp8", (1, 1), (1, block_k))
        want8 = grouped_matmul.gmm_fp8(
            lhs8, lhs_scale, values, scale, gs, rhs_scale_block=block, transpose_rhs=transpose,
            implementation="reference",
        )  # fmt: skip
        got8 = _gmm_gpu.gmm_block_scaled(
            lhs8, values, gs, scale, block=block, lhs_scale=lhs_scale, transpose_rhs=transpose, config=config,
            out_dtype=jnp.float32, interpret=True,
        )  # fmt: skip
        assert rel_err(got8, want8) < 1e-5
        assert rel_err(want8, want) < 0.1  # float8 activations: near the weight-only product
        for impl in ("xla", "pallas_interpret"):  # the public entry point on the other backends
            alt = grouped_matmul.gmm_fp8(
                lhs8, lhs_scale, values, scale, gs, rhs_scale_block=block, transpose_rhs=transpose,
                implementation=impl,
            )  # fmt: skip
            assert rel_err(alt, want8) < 1e-5, impl


@pytest.mark.parametrize(
    "m, sizes, config",
    [
        # groups that start and end inside one warpgroup's 64 rows, an empty first group, rows past the
        # groups; two N tiles of 64
        (260, [0, 5, 0, 70, 130, 1], "narrow"),
        (40, [10, 20, 0], "default"),  # fewer rows than one tile
        (256, [0, 0, 256], "default"),  # one group holds all, whole tiles
        (200, [60, 0, 100], "pairs"),  # two K blocks a step, two accumulators in flight
    ],
)
def test_mosaic_fp8_gmm_interpret(m, sizes, config):
    """The Mosaic GPU fp8 x fp8 kernel in jax's GPU interpreter: equal to the dequantized float32
    product (the reference) row by row, and zero past the groups; straddled row tiles are computed
    once per group and each pass writes only its own rows. The public entry point takes it for
    implementation="mosaic_interpret"."""
    from vishwam_jax.pallas_kernels import _gmm_fp8_mgpu, _mgpu_interpret
    from vishwam_jax.quantization import quantize

    k, n = 512 if config == "pairs" else 256, 128
    cfg = {
        "narrow": _gmm_fp8_mgpu.Config(tile_n=64, stages=2, band=2),
        "default": _gmm_fp8_mgpu.DEFAULT,
        "pairs": _gmm_fp8_mgpu.Config(stages=2, k_blocks=2),
    }[config]
    values, scale = _fp8_weights(len(sizes), k, n, (128, 128), True, seed=m)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
    x8, x_scale = quantize(x, "fp8", (1, 1), (1, 128))
    gs = jnp.asarray(sizes, jnp.int32)
    kw = dict(rhs_scale_block=(128, 128), transpose_rhs=True)
    want = grouped_matmul.gmm_fp8(x8, x_scale, values, scale, gs, implementation="reference", **kw)
    try:
        got = _gmm_fp8_mgpu.gmm_fp8_mgpu(x8, x_scale, values, scale, gs, config=cfg, interpret=True)
        public = grouped_matmul.gmm_fp8(x8, x_scale, values, scale, gs, implementation="mosaic_interpret", **kw)
    except Exception:
        _mgpu_interpret.reset()  # the interpreter's global state is unusable after a failure
        raise
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got[sum(sizes) :]), 0.0)
    np.testing.assert_array_equal(np.asarray(public), np.asarray(got))


def test_mosaic_fp8_gmm_takes_only_k_major_128_blocks():
    """Shapes the Mosaic kernel does not take go to the Triton kernel under "mosaic_*", and every
    other grouped matmul resolves "mosaic_*" to its Triton twin."""
    from vishwam_jax.pallas_kernels import _gmm_fp8_mgpu

    assert _gmm_fp8_mgpu.supported((300, 256), (4, 128, 256), (128, 128), True)
    assert not _gmm_fp8_mgpu.supported((300, 256), (4, 128, 256), (128, 128), False)  # [g, k, n]
    assert not _gmm_fp8_mgpu.supported((300, 200), (4, 128, 200), (128, 128), True)  # k not whole blocks
    assert not _gmm_fp8_mgpu.supported((300, 256), (4, 96, 256), (128, 128), True)  # n not whole tiles
    assert not _gmm_fp8_mgpu.supported((300, 256), (4, 128, 256), (64, 64), True)
    assert grouped_matmul.resolve_implementation("mosaic_gpu") == "pallas_gpu"
    assert grouped_matmul.resolve_implementation("mosaic_gpu", mosaic=True) == "mosaic_gpu"
    with pytest.raises(ValueError, match="Mosaic GPU fp8 gmm"):
        _gmm_fp8_mgpu.gmm_fp8_mgpu(*(jnp.zeros(s) for s in ((8, 200), (8, 2), (1, 128, 200), (1, 1, 2))), jnp.ones(1))


@pytest.mark.parametrize("sizes", [(50, 0, 70, 30, 11), (0, 161, 0, 0, 0), (64, 32, 0, 74, 0)])
def test_tgmm_fp8_kernel_interpret(sizes):
    """The float8 weight-gradient kernel (interpret mode) on 32-row token tiles that straddle group
    boundaries, empty groups, rows past the groups, K and N not multiples of the blocks: equal to the
    float32 product of the dequantized tiles, per group."""
    from vishwam_jax.quantization import dequantize, quantize

    m, k, n, tile = 170, 40, 24, 32
    rng = np.random.default_rng(sum(sizes))
    x, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((m, k), (m, n)))
    (x8, xs), (dy8, dys) = quantize(x, "fp8", (1, 1), (tile, 1)), quantize(dy, "fp8", (1, 1), (tile, 1))
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = _gmm_gpu.BlockConfig(bm=tile, bn=16, bk=16)
    got = _gmm_gpu.tgmm_fp8(x8, xs, dy8, dys, gs, tile=tile, config=cfg, interpret=True)
    xd, dyd = (np.asarray(dequantize(v, sc, "fp8", (1, 1), (tile, 1), jnp.float32)) for v, sc in ((x8, xs), (dy8, dys)))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for gi in range(len(sizes)):
        rows = slice(bounds[gi], bounds[gi + 1])
        np.testing.assert_allclose(got[gi], xd[rows].T @ dyd[rows], rtol=1e-5, atol=1e-4)
    for impl in ("xla", "reference"):
        alt = grouped_matmul.tgmm_fp8(x8, xs, dy8, dys, gs, tile=tile, implementation=impl)
        np.testing.assert_allclose(alt, got, rtol=1e-5, atol=1e-4)
    # Tokens last ([k, m] and [n, m], the layout FP8 wgmma reads as stored): the same products.
    for impl in ("pallas_interpret", "xla"):
        alt = grouped_matmul.tgmm_fp8(x8.T, xs, dy8.T, dys, gs, tile=tile, tokens_last=True, implementation=impl)
        np.testing.assert_allclose(alt, got, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="tokens last"):
        grouped_matmul.tgmm_fp8(x8, xs, dy8, dys, gs, tile=tile, tokens_last=True)


def test_block_scaled_gradient_and_config():
    """The lhs gradient of fp8 weights runs the transposed block-scaled kernel; tiles never straddle
    a scale block, whatever the regime's config."""
    values, scale = _fp8_weights(3, 40, 24, (16, 16), False, seed=3)
    lhs = jnp.asarray(np.random.default_rng(0).standard_normal((20, 40)), jnp.float32)
    gs = jnp.asarray([7, 0, 11], jnp.int32)

    def loss(impl):
        return jax.grad(
            lambda a: jnp.sum(
                grouped_matmul.gmm(a, values, gs, rhs_scale=scale, rhs_scale_block=(16, 16), implementation=impl) ** 2
            )
        )(lhs)

    assert rel_err(loss("pallas_interpret"), loss("reference")) < 1e-5
    for m, g in ((1, 8), (64, 8), (8192, 8)):
        cfg = _gmm_gpu.fit_block_scaled(_gmm_gpu.gmm_config(m, 7168, 2048, g, 2, 1), 128, 128)
        assert 128 % cfg.bk == 0 and 128 % cfg.bn == 0
    assert not _gmm_gpu.supports_block((100, 128)) and _gmm_gpu.supports_block((128, 128))
    with pytest.raises(ValueError, match="power-of-two blocks"):
        _gmm_gpu.gmm_block_scaled(lhs, values, gs, scale, block=(12, 16), interpret=True)


def test_packed_epilogue_fits_shared_memory():
    """The int16-pair epilogue's two exact products hold 4·bn·(bm + bn) bytes of shared memory:
    bm=128, bn=256 asked for 384 KiB on an H200 (launch failure); bn is narrowed to fit."""
    cfg = _gmm_gpu._fit_packed_epilogue(_gmm_gpu.BlockConfig(bm=128, bn=256, bk=64, num_warps=8, num_stages=3))
    assert cfg.bn == 128 and 4 * cfg.bn * (cfg.bm + cfg.bn) <= _gmm_gpu.SMEM_BUDGET
    small = _gmm_gpu.BlockConfig(bm=16, bn=128, bk=256)
    assert _gmm_gpu._fit_packed_epilogue(small) == small


def test_packed_int8_with_the_prefill_config(monkeypatch):
    """int16-pair weights through gmm's own config choice at many rows per group (the compute-bound
    128 x 256 tile, narrowed for the pair epilogue), N not a multiple of the narrowed block."""
    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    sizes = [130, 0, 120, 250]
    m, k, n = 512, 32, 300
    assert _gmm_gpu.gmm_config(m, k, n, len(sizes), 2, 1).bn == 256  # before the epilogue fit
    lhs, rhs, gs, scale = make(m, k, n, sizes, jnp.float32, int8=True)
    out = _gmm_gpu.gmm(lhs, rhs, gs, rhs_scale=scale.reshape(len(sizes), n), interpret=True)
    assert rel_err(out, numpy_gmm(lhs, rhs, sizes, scale=scale)) < TOL[jnp.dtype(jnp.float32)]
    np.testing.assert_array_equal(np.asarray(out[sum(sizes) :]), 0.0)


@pytest.mark.parametrize(
    "dtype,transpose,int8",
    [(jnp.bfloat16, False, False), (jnp.float32, True, False), (jnp.bfloat16, False, True), (jnp.float32, True, True)],
)
def test_public_gmm_interpret_options(dtype, transpose, int8):
    m, k, n, sizes = SHAPES["uneven_empty_first_last_short_sum"]
    lhs, rhs, gs, scale = make(m, k, n, sizes, dtype, transpose, int8)
    out = grouped_matmul.gmm(lhs, rhs, gs, transpose_rhs=transpose, rhs_scale=scale, implementation="pallas_interpret")
    ref = grouped_matmul.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose, rhs_scale=scale)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < TOL[jnp.dtype(dtype)]
    assert rel_err(out, numpy_gmm(lhs, rhs, sizes, transpose, scale)) < TOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_int8_pair_packing(dtype, monkeypatch):
    """int8 weights of 2**31..2**32 elements are read as int16 pairs (Pallas Triton's int32 offsets
    would wrap); force that path on a small problem: K and N ragged, several N blocks. K-major
    weights pair along K, which this K (33, odd) cannot: refused."""
    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    m, k, n, sizes = SHAPES["m_not_block_multiple_ragged_k_n"]
    n = 2 * n + 2  # even, and not a multiple of the block
    lhs, rhs, gs, scale = make(m, k, n, sizes, dtype, int8=True)
    assert _gmm_gpu.byte_offsets_overflow(rhs)
    out = _gmm_gpu.gmm(lhs, rhs, gs, rhs_scale=scale.reshape(len(sizes), n), config=TINY, interpret=True)
    assert rel_err(out, numpy_gmm(lhs, rhs, sizes, scale=scale)) < TOL[jnp.dtype(dtype)]
    assert k % 2
    with pytest.raises(NotImplementedError, match="32-bit offsets"):
        _gmm_gpu.gmm(lhs, rhs.swapaxes(1, 2), gs, transpose_rhs=True, config=TINY, interpret=True)


@pytest.fixture
def k_major_pairs(monkeypatch):
    """Forces the int16-pair path (as if every 1-byte weight had 2**31..2**32 elements) and counts
    the traces of the K-major pair loop, so that a test knows its products went through it."""
    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    traces = []
    loop = _gmm_gpu._gmm_k_loop_packed_k_major

    def counted(*args, **kwargs):
        traces.append(kwargs["cfg"])
        return loop(*args, **kwargs)

    monkeypatch.setattr(_gmm_gpu, "_gmm_k_loop_packed_k_major", counted)
    return traces


# K even and ragged (40 = 2.5 K steps of 16), N ragged over two blocks, empty first / middle / last
# groups, rows past sum(group_sizes)
K_MAJOR_SHAPE = SHAPES["uneven_empty_first_last_short_sum"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_int8_k_major_pairs(dtype, k_major_pairs):
    """K-major int8 weights [g, n, k] of 2**31..2**32 elements (forced) are read as int16 pairs of
    adjacent K elements: grid and group-aligned tiles, split K, and the public entry point."""
    m, k, n, sizes = K_MAJOR_SHAPE
    lhs, rhs, gs, scale = make(m, k, n, sizes, dtype, transpose=True, int8=True, seed=2)
    assert _gmm_gpu.byte_offsets_overflow(rhs) and k % 16 and k % 2 == 0
    want = numpy_gmm(lhs, rhs, sizes, transpose=True, scale=scale)
    for cfg in (TINY, TINY_ALIGNED, dataclasses.replace(TINY, k_splits=2)):
        got = _gmm_gpu.gmm(
            lhs, rhs, gs, transpose_rhs=True, rhs_scale=scale.reshape(len(sizes), n), config=cfg, interpret=True
        )
        assert rel_err(got, want) < TOL[jnp.dtype(dtype)], cfg
        np.testing.assert_array_equal(np.asarray(got[sum(sizes) :]), 0.0)
    got = grouped_matmul.gmm(lhs, rhs, gs, transpose_rhs=True, rhs_scale=scale, implementation="pallas_interpret")
    assert got.dtype == dtype and rel_err(got, want) < TOL[jnp.dtype(dtype)]
    assert len(k_major_pairs) == 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_k_major_pairs(dtype, k_major_pairs):
    """K-major float8 weights [g, n, k] of 2**31..2**32 elements (forced), weight-only, are read as
    int16 pairs along K; every K step takes its block's scale. Blocks of 16 (N) x 32 (K) over rhs as
    stored: taking the K side from the wrong end of `block` misplaces the scales."""
    m, k, n, sizes = K_MAJOR_SHAPE
    block = (16, 32)
    values, scale = _fp8_weights(len(sizes), k, n, block, True, seed=4)
    lhs = jnp.asarray(np.random.default_rng(1).standard_normal((m, k)), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    assert _gmm_gpu.block_scaled_takes(lhs, values, True)
    want = grouped_matmul.gmm_reference(lhs, values, gs, transpose_rhs=True, rhs_scale=scale, rhs_scale_block=block)
    for cfg in (TINY, dataclasses.replace(TINY, k_splits=2), None):
        got = _gmm_gpu.gmm_block_scaled(
            lhs, values, gs, scale, block=block, transpose_rhs=True, config=cfg, interpret=True
        )
        assert rel_err(got, want) < TOL[jnp.dtype(dtype)], cfg
        np.testing.assert_array_equal(np.asarray(got[sum(sizes) :]), 0.0)
    got = grouped_matmul.gmm(
        lhs, values, gs, transpose_rhs=True, rhs_scale=scale, rhs_scale_block=block, implementation="pallas_interpret"
    )
    assert rel_err(got, want) < TOL[jnp.dtype(dtype)]
    assert len(k_major_pairs) == 4


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_k_major_pairs_lhs_gradient(fp8, k_major_pairs):
    """The lhs gradient of K-major 1-byte weights (forced into the pair range) is gmm with the
    weights untransposed, [g, n, k] read as [g, k', n'] with n' = k: the pairs along N."""
    m, k, n, sizes = K_MAJOR_SHAPE
    lhs, rhs, gs, scale = make(m, k, n, sizes, transpose=True, int8=True, seed=5)
    kw = dict(transpose_rhs=True, rhs_scale=scale)
    if fp8:
        rhs, scale = _fp8_weights(len(sizes), k, n, (16, 32), True, seed=5)
        kw = dict(transpose_rhs=True, rhs_scale=scale, rhs_scale_block=(16, 32))
    ours = functools.partial(grouped_matmul.gmm, implementation="pallas_interpret", **kw)
    ref = functools.partial(grouped_matmul.gmm_reference, **kw)
    got = jax.grad(lambda x: loss(ours, x, rhs, gs))(lhs)
    want = jax.grad(lambda x: loss(ref, x, rhs, gs))(lhs)
    assert rel_err(got, want) < 1e-5
    assert k_major_pairs  # the forward product took the K-major pairs


def test_preferred_element_type():
    lhs, rhs, gs, _ = make(*SHAPES["all_groups_in_one_block"], dtype=jnp.bfloat16)
    out = grouped_matmul.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32, implementation="pallas_interpret")
    assert out.dtype == jnp.float32
    ref = grouped_matmul.gmm_reference(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert rel_err(out, ref) < 1e-5  # float32 out: no bf16 rounding of the accumulator


def loss(gmm_fn, lhs, rhs, gs, **kw):
    return jnp.sum(jnp.sin(gmm_fn(lhs, rhs, gs, **kw)))


@pytest.mark.parametrize("transpose", [False, True])
def test_gradients_match_reference(transpose):
    lhs, rhs, gs, _ = make(*SHAPES["uneven_empty_first_last_short_sum"], transpose=transpose)
    ours = functools.partial(grouped_matmul.gmm, transpose_rhs=transpose, implementation="pallas_interpret")
    ref = functools.partial(grouped_matmul.gmm_reference, transpose_rhs=transpose)
    got = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(lhs, rhs, gs)
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(lhs, rhs, gs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < 1e-5
    assert float(jnp.abs(got[0][40:]).max()) == 0.0  # rows past the groups do not affect the output


def test_int8_lhs_gradient():
    lhs, rhs, gs, scale = make(*SHAPES["m_not_block_multiple_ragged_k_n"], int8=True)
    ours = functools.partial(grouped_matmul.gmm, rhs_scale=scale, implementation="pallas_interpret")
    ref = functools.partial(grouped_matmul.gmm_reference, rhs_scale=scale)
    got = jax.grad(lambda x: loss(ours, x, rhs, gs))(lhs)
    want = jax.grad(lambda x: loss(ref, x, rhs, gs))(lhs)
    assert rel_err(got, want) < 1e-5


def test_tgmm_matches_reference():
    m, k, n, sizes = 45, 33, 17, [0, 9, 1, 0, 16, 2, 0]  # empty first/last/middle, sum < m
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    want = grouped_matmul.tgmm_reference(lhs, grad, gs, num_groups=len(sizes))
    got = _gmm_gpu.tgmm(lhs, grad, gs, config=TINY, interpret=True)
    assert got.shape == (len(sizes), k, n)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[0]), 0.0)  # empty group: zeros, not garbage
    for impl in ("xla", "reference"):
        got = grouped_matmul.tgmm(lhs, grad, gs, num_groups=len(sizes), implementation=impl)
        assert rel_err(got, want) < 1e-5, impl


@pytest.mark.parametrize("transpose,int8", [(False, False), (True, False), (False, True)])
def test_xla_path_matches_reference(transpose, int8):
    for name in ("uneven_empty_first_last_short_sum", "m_not_block_multiple_ragged_k_n"):
        m, k, n, sizes = SHAPES[name]
        lhs, rhs, gs, scale = make(m, k, n, sizes, transpose=transpose, int8=int8)
        out = grouped_matmul.gmm(lhs, rhs, gs, transpose_rhs=transpose, rhs_scale=scale, implementation="xla")
        ref = grouped_matmul.gmm_reference(lhs, rhs, gs, transpose_rhs=transpose, rhs_scale=scale)
        assert rel_err(out, ref) < 1e-5, name


def test_xla_path_gradients():
    lhs, rhs, gs, _ = make(*SHAPES["uneven_empty_first_last_short_sum"])
    got = jax.grad(
        functools.partial(loss, functools.partial(grouped_matmul.gmm, implementation="xla")), argnums=(0, 1)
    )(lhs, rhs, gs)
    want = jax.grad(functools.partial(loss, grouped_matmul.gmm_reference), argnums=(0, 1))(lhs, rhs, gs)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_tpu_kernel_interpret():
    from vishwam_jax.pallas_kernels import _gmm_tpu

    m, k, n, sizes = 200, 256, 256, [0, 70, 3, 50, 30, 0]  # 2 row tiles of 128, sum < m
    lhs, rhs, gs, scale = make(m, k, n, sizes, transpose=True, int8=True)
    out = _gmm_tpu.gmm(lhs, rhs, gs, transpose_rhs=True, rhs_scale=scale.reshape(len(sizes), n), interpret=True)
    ref = grouped_matmul.gmm_reference(lhs, rhs, gs, transpose_rhs=True, rhs_scale=scale)
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[153:]), 0.0)


def test_work_items_cover_every_row_once():
    rng = np.random.default_rng(0)
    m, g = 45, 6
    for bm in (1, 16):
        items = jax.jit(_gmm_gpu.make_work_items, static_argnums=(1, 2))
        for trial in range(12):
            sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
            sizes[rng.random(g) < 0.3] = 0
            group_ids, tile_ids, starts, ends, count = map(np.asarray, items(jnp.asarray(sizes), m, bm))
            hits = np.zeros(m, int)
            for gi, ti in zip(group_ids[: count[0]], tile_ids[: count[0]]):
                rows = np.arange(ti * bm, min((ti + 1) * bm, m))
                mine = rows[(rows >= starts[gi]) & (rows < ends[gi])]
                assert mine.size, (trial, "a work item with no rows")
                hits[mine] += 1
            np.testing.assert_array_equal(hits, 1)  # every row written by exactly one visit (incl. padding)
            assert count[0] <= len(group_ids) == _gmm_gpu.max_work_items(m, g, bm)
            assert np.all(np.diff(tile_ids[: count[0]]) >= 0)  # visits of one tile are consecutive


def test_group_aligned_work_items_read_each_small_group_once():
    rng = np.random.default_rng(1)
    m, g, bm = 45, 6, 8
    items = jax.jit(_gmm_gpu.make_group_aligned_work_items, static_argnums=(1, 2))
    for trial in range(12):
        sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
        sizes[rng.random(g) < 0.3] = 0
        group_ids, row_starts, starts, ends, count = map(np.asarray, items(jnp.asarray(sizes), m, bm))
        live = group_ids[: count[0]]
        hits = np.zeros(m, int)
        for gi, r0 in zip(live, row_starts[: count[0]]):
            rows = np.arange(r0, min(r0 + bm, m))
            mine = rows[(rows >= starts[gi]) & (rows < ends[gi])]
            assert mine.size and mine[0] == r0, (trial, "an item must start on one of its group's rows")
            hits[mine] += 1
        np.testing.assert_array_equal(hits, 1)
        padding = m - sizes.sum()
        expected = np.concatenate([-(-sizes // bm), [-(-padding // bm)]])  # ceil(size / bm) visits per group
        np.testing.assert_array_equal(np.bincount(live, minlength=g + 1), expected)
        assert count[0] <= len(group_ids) == _gmm_gpu.max_work_items(m, g, bm, group_aligned=True)


def test_decode_config_group_aligned():
    cfg = _gmm_gpu.gmm_config(128, 6144, 65536, 8, group_aligned=True)  # Grok-1 decode, 64 tokens
    assert cfg.group_aligned and cfg.bm == 32
    assert not _gmm_gpu.gmm_config(128, 6144, 65536, 8, group_aligned=False).group_aligned
    assert not _gmm_gpu.gmm_config(8 * 16384, 7168, 4096, 32, group_aligned=True).group_aligned  # compute-bound


def test_backend_selection(monkeypatch):
    assert grouped_matmul.resolve_implementation() == "xla"  # CPU: interpret mode is too slow for models
    assert grouped_matmul.resolve_implementation("pallas_interpret") == "pallas_interpret"
    monkeypatch.setenv(grouped_matmul.ENV_VAR, "reference")
    assert grouped_matmul.resolve_implementation() == "reference"
    assert grouped_matmul.resolve_implementation("auto") == "reference"
    assert grouped_matmul.resolve_implementation("xla") == "xla"  # an explicit choice still wins
    with pytest.raises(ValueError):
        grouped_matmul.resolve_implementation("cublas")
    lhs, rhs, gs, _ = make(*SHAPES["all_groups_in_one_block"])
    jaxpr = str(jax.make_jaxpr(lambda a, b, c: grouped_matmul.gmm(a, b, c))(lhs, rhs, gs))
    assert "ragged_dot" not in jaxpr  # the env var really routed the call to the reference


def test_rejects_bad_arguments():
    lhs, rhs, gs, scale = make(12, 24, 20, [3, 0, 4, 5], int8=True)
    with pytest.raises(ValueError):
        grouped_matmul.gmm(lhs, rhs, gs)  # int8 without scales
    with pytest.raises(ValueError):
        grouped_matmul.gmm(lhs, rhs, gs[:3], rhs_scale=scale)
    with pytest.raises(ValueError):
        grouped_matmul.gmm(lhs[:, :5], rhs, gs, rhs_scale=scale)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_weights_whose_offsets_would_wrap_are_read_as_int16_pairs(dtype, monkeypatch):
    """Weight-only [g, k, n] float8 weights of 2**31..2**32 elements (forced small here), whose 32-bit
    offsets would wrap around (garbage on an H100, measured), are read as int16 pairs: every K step
    scaled by its block, K and N ragged, uneven and empty groups, split K too."""
    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    m, k, n, sizes = SHAPES["m_not_block_multiple_ragged_k_n"]
    n = 2 * n + 2  # even, and not a multiple of the block
    values, scale = _fp8_weights(len(sizes), k, n, (16, 16), False, seed=3)
    assert _gmm_gpu.byte_offsets_overflow(values)
    lhs = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    want = grouped_matmul.gmm_reference(lhs, values, gs, rhs_scale=scale, rhs_scale_block=(16, 16))
    for cfg in (TINY, dataclasses.replace(TINY, k_splits=2)):
        got = _gmm_gpu.gmm_block_scaled(lhs, values, gs, scale, block=(16, 16), config=cfg, interpret=True)
        assert rel_err(got, want) < TOL[jnp.dtype(dtype)]
    got = grouped_matmul.gmm(
        lhs, values, gs, rhs_scale=scale, rhs_scale_block=(16, 16), implementation="pallas_interpret"
    )
    assert rel_err(got, want) < TOL[jnp.dtype(dtype)]


def test_other_fp8_operands_whose_offsets_would_wrap_are_dequantized(monkeypatch):
    """The float8 products the int16 pairs do not cover (weights with an odd last dimension, here
    K-major with k odd; float8 activations; the token-tiled weight gradient) never reach the
    block-scaled kernels with such an operand: gmm, gmm_fp8 and tgmm_fp8 dequantize it and still give
    the reference's product. int8 weights with an odd last dimension have no fallback: refused."""
    from vishwam_jax.quantization import quantize

    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)

    def refuse(*args, **kwargs):
        raise AssertionError("the block-scaled kernel was called")

    monkeypatch.setattr(_gmm_gpu, "gmm_block_scaled", refuse)
    monkeypatch.setattr(_gmm_gpu, "tgmm_fp8", refuse)
    m, k, n, sizes = SHAPES["uneven_empty_first_last_short_sum"]
    lhs = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    odd_k = k - 7
    values, scale = _fp8_weights(len(sizes), odd_k, n, (16, 16), True, seed=3)
    assert not _gmm_gpu.block_scaled_takes(lhs[:, :odd_k], values, True)
    kw = dict(rhs_scale=scale, rhs_scale_block=(16, 16), transpose_rhs=True)
    want = grouped_matmul.gmm_reference(lhs[:, :odd_k], values, gs, **kw)
    got = grouped_matmul.gmm(lhs[:, :odd_k], values, gs, implementation="pallas_interpret", **kw)
    assert rel_err(got, want) < 1e-5
    _, q, _, q_scale = make(m, odd_k, n, sizes, transpose=True, int8=True)
    with pytest.raises(NotImplementedError, match="32-bit offsets"):
        _gmm_gpu.gmm(lhs[:, :odd_k], q, gs, transpose_rhs=True, rhs_scale=q_scale[..., 0], interpret=True)
    values, scale = _fp8_weights(len(sizes), k, n, (16, 16), True, seed=3)  # k even: pairs fit, but lhs is float8
    x8, x_scale = quantize(lhs, "fp8", (1, 1), (1, 16))
    assert not _gmm_gpu.block_scaled_takes(x8, values, True)
    args = (x8, x_scale, values, scale, gs)
    kw = dict(rhs_scale_block=(16, 16), transpose_rhs=True)
    got = grouped_matmul.gmm_fp8(*args, implementation="pallas_interpret", **kw)
    assert rel_err(got, grouped_matmul.gmm_fp8(*args, implementation="reference", **kw)) < 1e-5
    dy8, dy_scale = quantize(lhs[:, :n], "fp8", (1, 1), (16, 1))
    xt8, xt_scale = quantize(lhs, "fp8", (1, 1), (16, 1))
    targs = (xt8, xt_scale, dy8, dy_scale, gs)
    got_t = grouped_matmul.tgmm_fp8(*targs, tile=16, implementation="pallas_interpret")
    assert rel_err(got_t, grouped_matmul.tgmm_fp8(*targs, tile=16, implementation="reference")) < 1e-5


@pytest.mark.parametrize("splits", [2, 4])
def test_split_k_equals_one_pass(splits, monkeypatch):
    """K split over programs (partial float32 sums added after): the same products as one pass, on
    ragged K with uneven and empty groups, for float, int8 (also as int16 pairs along N and, K-major,
    along K) and fp8 weights (weight-only and fp8 x fp8); a split with no K steps left contributes
    zeros."""
    from vishwam_jax.quantization import quantize

    m, k, n, sizes = (45, 70, 34, [9, 1, 16, 2, 17])  # 5 K steps of 16: 4 splits get 2, 2, 1 and 0
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = dataclasses.replace(TINY, k_splits=splits)
    lhs, rhs, _, _ = make(m, k, n, sizes)
    assert rel_err(_gmm_gpu.gmm(lhs, rhs, gs, config=cfg, interpret=True), numpy_gmm(lhs, rhs, sizes)) < 1e-5
    lhs, q, _, scale = make(m, k, n, sizes, int8=True)
    want = numpy_gmm(lhs, q, sizes, scale=scale)
    assert rel_err(_gmm_gpu.gmm(lhs, q, gs, rhs_scale=scale[:, 0], config=cfg, interpret=True), want) < 1e-5
    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    assert rel_err(_gmm_gpu.gmm(lhs, q, gs, rhs_scale=scale[:, 0], config=cfg, interpret=True), want) < 1e-5
    q_t = q.swapaxes(1, 2)
    k_major = _gmm_gpu.gmm(lhs, q_t, gs, transpose_rhs=True, rhs_scale=scale[:, 0], config=cfg, interpret=True)
    assert rel_err(k_major, want) < 1e-5
    monkeypatch.undo()
    values, blocks = _fp8_weights(len(sizes), k, n, (16, 16), False, seed=1)
    kw = dict(block=(16, 16), interpret=True)
    want = grouped_matmul.gmm_reference(lhs, values, gs, rhs_scale=blocks, rhs_scale_block=(16, 16))
    assert rel_err(_gmm_gpu.gmm_block_scaled(lhs, values, gs, blocks, config=cfg, **kw), want) < 1e-5
    x8, x_scale = quantize(lhs, "fp8", (1, 1), (1, 16))
    one_pass = _gmm_gpu.gmm_block_scaled(x8, values, gs, blocks, lhs_scale=x_scale, config=TINY, **kw)
    split = _gmm_gpu.gmm_block_scaled(x8, values, gs, blocks, lhs_scale=x_scale, config=cfg, **kw)
    assert rel_err(split, one_pass) < 1e-5


def test_split_k_is_chosen_for_too_few_programs_only():
    """A batch-1 dense projection (one row tile, few N blocks, long K) gets K splits; an MoE decode
    call with many (expert, N block) programs, or a short K, does not."""
    dense = _gmm_gpu.fit_block_scaled(_gmm_gpu.gmm_config(1, 7168, 1536, 1, 2, 1), 128, 128)
    assert _gmm_gpu.split_k(dense, 1, 7168, 1536, 1).k_splits > 1
    moe = _gmm_gpu.fit_block_scaled(_gmm_gpu.gmm_config(8, 7168, 4096, 256, 2, 1), 128, 128)
    assert _gmm_gpu.split_k(moe, 8, 7168, 4096, 256).k_splits == 1
    assert _gmm_gpu.split_k(dense, 1, 256, 1536, 1).k_splits == 1
