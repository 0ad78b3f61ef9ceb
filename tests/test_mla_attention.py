"""MLA kernels against their float32 references (CPU: the Pallas kernels run in interpret mode).

Decode: cache lengths 1 / 63 / 64 / 65 around the 64-token tile, ragged batches with a 0-length
row, s_q = 1 and 2 (causal among the new tokens), paged caches with shuffled block ids, 8 / 16 /
128 heads, split-KV on and off, stale slots holding NaN. Dims are kept small where they are free
(v_head_dim 32 + rope 16) except in the tests marked 576, which use DeepSeek-V3's 512 + 64.
Prefill: forward and dq / dk / dv against jax.grad of the reference, t not a multiple of a block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam_jax.pallas_kernels import mla_attention

DV, DR = 32, 16  # small stand-ins for 512 / 64 (powers of two, as the Triton kernel needs)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite output"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _decode_inputs(
    rng, lengths, s_q, heads, *, dv=DV, dr=DR, paged=False, cache_len=None, page=64, stale_nan=False, dtype=jnp.float32
):
    batch = len(lengths)
    d = dv + dr
    cache_len = cache_len or max(max(lengths), 1)
    q = jnp.asarray(rng.standard_normal((batch, s_q, heads, d)), dtype)
    if paged:
        per_row = -(-cache_len // page)
        n_blocks = batch * per_row + 3  # spare blocks that no row owns
        cache = rng.standard_normal((n_blocks, page, d))
        table = rng.permutation(n_blocks)[: batch * per_row].reshape(batch, per_row)
        if stale_nan:
            for b, n in enumerate(lengths):
                for t in range(n, per_row * page):
                    cache[table[b, t // page], t % page] = np.nan
        return q, jnp.asarray(cache, dtype), jnp.asarray(lengths, jnp.int32), jnp.asarray(table, jnp.int32)
    cache = rng.standard_normal((batch, cache_len, d))
    if stale_nan:
        for b, n in enumerate(lengths):
            cache[b, n:] = np.nan
    return q, jnp.asarray(cache, dtype), jnp.asarray(lengths, jnp.int32), None


def _check_decode(q, cache, lengths, table, *, dv=DV, causal=True, num_splits=None, impl="pallas_interpret", tol=1e-5):
    kw = dict(softmax_scale=0.3, block_table=table, v_head_dim=dv, causal=causal)
    ref, ref_lse = mla_attention.mla_decode_reference(q, cache, lengths, return_lse=True, **kw)
    out, lse = mla_attention.mla_decode(
        q, cache, lengths, num_splits=num_splits, implementation=impl, return_lse=True, **kw
    )
    assert out.shape == q.shape[:3] + (dv,) and out.dtype == q.dtype
    assert _rel(out, ref) < tol
    # a row with nothing visible: zeros and lse = -inf, in the kernel as in the reference
    empty = ~np.isfinite(np.asarray(ref_lse))
    assert np.array_equal(empty, ~np.isfinite(np.asarray(lse)))
    assert np.all(np.asarray(out)[empty] == 0)
    np.testing.assert_allclose(np.asarray(lse)[~empty], np.asarray(ref_lse)[~empty], rtol=1e-5, atol=1e-5)
    return out, ref


# -- the reference itself ------------------------------------------------------------------------
def test_reference_matches_dense_softmax():
    """The reference against an independent per-row numpy softmax (including the causal rule)."""
    rng = np.random.default_rng(0)
    q, cache, lengths, _ = _decode_inputs(rng, [5, 3], 2, 4)
    out = np.asarray(mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3, v_head_dim=DV))
    qn, cn = np.asarray(q, np.float64), np.asarray(cache, np.float64)
    for b, n in enumerate([5, 3]):
        for i in range(2):
            vis = n - 2 + i + 1
            s = qn[b, i] @ cn[b, :vis].T * 0.3
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[b, i], p @ cn[b, :vis, :DV], rtol=1e-5, atol=1e-6)


def test_causal_flag_matters():
    """Guards the causal tests below against vacuity: the two rules give different answers."""
    rng = np.random.default_rng(1)
    q, cache, lengths, _ = _decode_inputs(rng, [9], 2, 4)
    a = mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3, v_head_dim=DV, causal=True)
    b = mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3, v_head_dim=DV, causal=False)
    assert _rel(a[:, 0], b[:, 0]) > 1e-2
    np.testing.assert_allclose(a[:, 1], b[:, 1], rtol=1e-6)


# -- the Pallas GPU kernel, interpreted ---------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_lengths_around_the_tile(num_splits):
    """Lengths 0, 1, 63, 64, 65 in one ragged batch (cache of 65 slots, 64-token tiles); stale
    slots hold NaN, which must not leak into p @ v."""
    rng = np.random.default_rng(2)
    q, cache, lengths, _ = _decode_inputs(rng, [0, 1, 63, 64, 65], 1, 8, cache_len=65, stale_nan=True)
    _check_decode(q, cache, lengths, None, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_two_new_tokens_causal(num_splits):
    """s_q = 2: the first new token must not see the second; a row of length 1 leaves query 0
    with nothing visible (zeros), a row of length 0 leaves both empty."""
    rng = np.random.default_rng(3)
    q, cache, lengths, _ = _decode_inputs(rng, [2, 1, 0, 65, 64], 2, 16, cache_len=70)
    out, _ = _check_decode(q, cache, lengths, None, num_splits=num_splits)
    assert np.all(np.asarray(out)[1, 0] == 0) and np.all(np.asarray(out)[2] == 0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_paged_shuffled_blocks(num_splits):
    rng = np.random.default_rng(4)
    q, cache, lengths, table = _decode_inputs(
        rng, [1, 130, 64, 0, 191], 1, 8, paged=True, cache_len=192, stale_nan=True
    )
    _check_decode(q, cache, lengths, table, num_splits=num_splits)


def test_decode_paged_two_tokens_non_causal():
    rng = np.random.default_rng(5)
    q, cache, lengths, table = _decode_inputs(rng, [65, 3, 128], 2, 16, paged=True, cache_len=128)
    _check_decode(q, cache, lengths, table, causal=False, num_splits=2)


def test_decode_576_128_heads():
    """DeepSeek-V3's real dims: 128 heads, 512 + 64 channels; split-KV on, ragged, 2 new tokens."""
    rng = np.random.default_rng(6)
    q, cache, lengths, _ = _decode_inputs(rng, [70, 33], 2, 128, dv=512, dr=64, cache_len=70)
    _check_decode(q, cache, lengths, None, dv=512, num_splits=2, tol=2e-5)


def test_decode_576_paged_bf16():
    """bf16 inputs (the production dtype): output stays bf16, error at bf16 level."""
    rng = np.random.default_rng(7)
    q, cache, lengths, table = _decode_inputs(
        rng, [100, 7], 1, 16, dv=512, dr=64, paged=True, cache_len=128, dtype=jnp.bfloat16
    )
    _check_decode(q, cache, lengths, table, dv=512, num_splits=2, tol=2e-2)


def test_decode_kernel_variants():
    """The tuning knobs (value columns split over programs, q re-read per tile) compute the same."""
    from vishwam_jax.pallas_kernels import _mla_gpu

    rng = np.random.default_rng(8)
    q, cache, lengths, _ = _decode_inputs(rng, [40, 65], 2, 16, dv=64, cache_len=65, stale_nan=True)
    ref = mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3, v_head_dim=64)
    out, _ = _mla_gpu.mla_decode_gpu(
        q,
        cache,
        lengths,
        softmax_scale=0.3,
        v_head_dim=64,
        num_splits=2,
        block_h=16,
        block_k=32,
        v_splits=2,
        reload_q=True,
        interpret=True,
    )
    assert _rel(out, ref) < 1e-5


# -- the Mosaic GPU kernel (Hopper), in jax's GPU interpreter and lowered for CUDA ---------------
def _check_mosaic(q, cache, lengths, table, **kw):
    from vishwam_jax.pallas_kernels import _mgpu_interpret

    try:
        return _check_decode(q, cache, lengths, table, dv=512, impl="mosaic_interpret", tol=2e-2, **kw)
    except Exception:
        _mgpu_interpret.reset()  # the interpreter's global state is unusable after a failure
        raise


def test_mosaic_decode_lengths_around_the_tile():
    """Lengths 0, 1, 63, 64, 65, 300 in one ragged batch of 64 heads (300: five tiles, so the
    two-slot ring wraps twice); stale slots hold NaN, which the kernel must zero in shared memory
    before P @ V (the tile is loaded whole by TMA)."""
    rng = np.random.default_rng(20)
    q, cache, lengths, _ = _decode_inputs(
        rng, [0, 1, 63, 64, 65, 300], 1, 64, dv=512, dr=64, cache_len=320, stale_nan=True, dtype=jnp.bfloat16
    )
    _check_mosaic(q, cache, lengths, None, num_splits=1)


def test_mosaic_decode_paged_shuffled_splits():
    """Paged (shuffled 64-token pages, NaN past each length), two KV splits merged by lse; 447
    tokens make splits of four and three tiles."""
    rng = np.random.default_rng(21)
    q, cache, lengths, table = _decode_inputs(
        rng, [1, 330, 64, 0, 447], 1, 64, dv=512, dr=64, paged=True, cache_len=448, stale_nan=True, dtype=jnp.bfloat16
    )
    _check_mosaic(q, cache, lengths, table, num_splits=2)


def test_mosaic_decode_two_tokens_two_row_tiles():
    """s_q = 2 with 64 heads: two row tiles, one per new token, causal between them (a row of length
    1 leaves token 0 empty, length 0 both); two splits."""
    rng = np.random.default_rng(22)
    q, cache, lengths, _ = _decode_inputs(
        rng, [2, 1, 0, 65, 64], 2, 64, dv=512, dr=64, cache_len=128, dtype=jnp.bfloat16
    )
    out, _ = _check_mosaic(q, cache, lengths, None, num_splits=2)
    assert np.all(np.asarray(out)[1, 0] == 0) and np.all(np.asarray(out)[2] == 0)


def test_mosaic_decode_128_heads_paged_non_causal():
    rng = np.random.default_rng(23)
    q, cache, lengths, table = _decode_inputs(
        rng, [65, 128], 2, 128, dv=512, dr=64, paged=True, cache_len=128, dtype=jnp.bfloat16
    )
    _check_mosaic(q, cache, lengths, table, causal=False, num_splits=None)  # the split heuristic's choice


def test_mosaic_decode_other_schedule():
    """The schedule the module does not default to (PREFETCH_QK: the next tile's Q K^T issued behind
    P @ V with S carried across iterations, or issue-await-continue)."""
    from vishwam_jax.pallas_kernels import _mgpu_interpret, _mla_mgpu

    rng = np.random.default_rng(24)
    q, cache, lengths, _ = _decode_inputs(
        rng, [300, 1, 0], 1, 64, dv=512, dr=64, cache_len=320, stale_nan=True, dtype=jnp.bfloat16
    )
    ref = mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3)
    try:
        out, _ = _mla_mgpu.mla_decode_mgpu(
            q, cache, lengths, softmax_scale=0.3, num_splits=2, prefetch_qk=not _mla_mgpu.PREFETCH_QK, interpret=True
        )
    except Exception:
        _mgpu_interpret.reset()
        raise
    assert _rel(out, ref) < 2e-2


def test_auto_decode_takes_the_mosaic_kernel_on_hopper_only(monkeypatch):
    """Auto mode: the Mosaic GPU kernel where a Hopper GPU and the shapes allow it, else the Triton one."""
    import types

    q = jnp.zeros((2, 1, 128, 576), jnp.bfloat16)
    cache = jnp.zeros((2, 4096, 576), jnp.bfloat16)
    for capability, heads, dtype, expected in (
        ("9.0", 128, jnp.bfloat16, True),
        ("9.0", 16, jnp.bfloat16, False),  # not a multiple of 64 rows
        ("9.0", 128, jnp.float32, False),
        ("8.0", 128, jnp.bfloat16, False),  # no wgmma before Hopper
        ("10.0", 128, jnp.bfloat16, False),
    ):
        gpu = types.SimpleNamespace(platform="gpu", compute_capability=capability)
        monkeypatch.setattr(mla_attention.jax, "devices", lambda gpu=gpu: [gpu])
        query = jnp.zeros(q.shape[:2] + (heads, 576), dtype)
        assert mla_attention._mosaic_faster(query, cache.astype(dtype), 512) is expected, (capability, heads, dtype)


def test_mosaic_decode_rejects_other_shapes():
    from vishwam_jax.pallas_kernels import _mla_mgpu

    q = jnp.zeros((1, 1, 16, 576), jnp.bfloat16)  # 16 heads: not a 64-row tile
    cache = jnp.zeros((1, 128, 576), jnp.bfloat16)
    assert not _mla_mgpu.supported(q.shape, cache.shape, q.dtype)
    assert _mla_mgpu.supported((1, 1, 128, 576), cache.shape, jnp.bfloat16)
    assert not _mla_mgpu.supported((1, 1, 128, 576), cache.shape, jnp.float32)
    assert not _mla_mgpu.supported((1, 1, 128, 576), (1, 100, 576), jnp.bfloat16)  # not whole tiles
    with pytest.raises(ValueError, match="heads % 64 == 0"):
        mla_attention.mla_decode(q, cache, jnp.array([5]), softmax_scale=0.1, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="for mla_decode only"):
        x = jnp.zeros((1, 8, 2, 192))
        mla_attention.mla_prefill(x, x, x[..., :128], softmax_scale=0.1, implementation="mosaic_gpu")


@pytest.mark.parametrize("variant", ["contiguous", "paged", "paged, Q K^T prefetch"])
def test_mosaic_decode_lowers_for_cuda(variant):
    """DeepSeek-V3's decode shape (batch 64, 128 heads, 4096-token caches) through Mosaic GPU's own
    lowering for a Hopper target, on this CPU: layouts, tiling, TMA and wgmma shapes, and the shared
    memory budget are checked there (compiling to SASS needs the GPU)."""
    from vishwam_jax.pallas_kernels import _mla_mgpu
    from vishwam_jax.utils import kernel_inspection

    batch, heads, length = 64, 128, 4096
    q = jax.ShapeDtypeStruct((batch, 1, heads, 576), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if variant == "contiguous":
        cache = jax.ShapeDtypeStruct((batch, length, 576), jnp.bfloat16)
        fn = lambda q, c, n: mla_attention.mla_decode(q, c, n, softmax_scale=0.1, implementation="mosaic_gpu")  # noqa: E731
        text = kernel_inspection.lower_for_cuda(fn, q, cache, lengths)
    else:
        cache = jax.ShapeDtypeStruct((batch * length // 64, 64, 576), jnp.bfloat16)
        table = jax.ShapeDtypeStruct((batch, length // 64), jnp.int32)
        prefetch = "prefetch" in variant

        def fn(q, c, n, t):
            return _mla_mgpu.mla_decode_mgpu(q, c, n, t, softmax_scale=0.1, num_splits=2, prefetch_qk=prefetch)

        text = kernel_inspection.lower_for_cuda(fn, q, cache, lengths, table)
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text


# -- the other implementations ------------------------------------------------------------------
@pytest.mark.parametrize("paged", [False, True])
def test_decode_xla(paged):
    rng = np.random.default_rng(9)
    q, cache, lengths, table = _decode_inputs(rng, [0, 1, 63, 64, 65], 2, 8, paged=paged, cache_len=65)
    _check_decode(q, cache, lengths, table, impl="xla")


@pytest.mark.parametrize("paged", [False, True])
def test_decode_tpu_kernel_interpreted(paged):
    from vishwam_jax.pallas_kernels import _mla_tpu

    rng = np.random.default_rng(10)
    q, cache, lengths, table = _decode_inputs(rng, [0, 64, 130], 2, 8, paged=paged, cache_len=130, stale_nan=True)
    ref = mla_attention.mla_decode_reference(q, cache, lengths, softmax_scale=0.3, block_table=table, v_head_dim=DV)
    out, _ = _mla_tpu.mla_decode_tpu(
        q, cache, lengths, table, softmax_scale=0.3, v_head_dim=DV, num_splits=2, block_k=64, interpret=True
    )
    assert _rel(out, ref) < 1e-5


def test_auto_backend_and_env(monkeypatch):
    assert mla_attention._resolve(None) == ("xla", True)  # CPU
    monkeypatch.setenv(mla_attention.ENV_VAR, "reference")
    assert mla_attention._resolve(None) == ("reference", False)
    assert mla_attention._resolve("xla") == ("xla", False)  # an explicit choice wins
    with pytest.raises(ValueError):
        mla_attention._resolve("bogus")


def test_auto_sends_small_contiguous_caches_to_xla_on_gpu(monkeypatch):
    """Auto on GPU: caches up to XLA_BELOW_CACHE_BYTES run the einsum form (faster there on an H100);
    larger or paged caches run the kernel (here replaced by a marker, since CPU cannot run Triton)."""
    monkeypatch.setattr(mla_attention, "_platform", lambda: "gpu")
    monkeypatch.delenv(mla_attention.ENV_VAR, raising=False)
    ran = []
    monkeypatch.setattr(
        mla_attention._mla_gpu,
        "mla_decode_gpu",
        lambda *a, **k: ran.append("kernel") or (a[0][..., :512], a[0][..., 0]),
    )
    monkeypatch.setattr(mla_attention, "mla_decode_xla", lambda *a, **k: ran.append("xla") or a[0][..., :512])
    q = jnp.zeros((1, 1, 16, 576), jnp.bfloat16)
    small = jnp.zeros((1, 4096, 576), jnp.bfloat16)  # 4.7 MB
    mla_attention.mla_decode(q, small, jnp.array([5]), softmax_scale=0.1)
    big = jax.ShapeDtypeStruct((1, 65536, 576), jnp.bfloat16)  # 75 MB: traced only
    jax.eval_shape(lambda c: mla_attention.mla_decode(q, c, jnp.array([5]), softmax_scale=0.1), big)
    pool, table = jnp.zeros((64, 64, 576), jnp.bfloat16), jnp.zeros((1, 64), jnp.int32)  # paged: kernel
    mla_attention.mla_decode(q, pool, jnp.array([5]), softmax_scale=0.1, block_table=table)
    chunk = jnp.zeros((1, 512, 16, 576), jnp.bfloat16)  # a prefill chunk: its scores would not fit XLA's form
    mla_attention.mla_decode(chunk, small, jnp.array([512]), softmax_scale=0.1)
    assert ran == ["xla", "kernel", "kernel", "kernel"]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=np.zeros((2, 1, 4, 48))), "q has 48 channels per head but the cache 49"),
        (dict(q=np.zeros((2, 4, 49))), "q must be"),
        (dict(lengths=np.zeros((3,), np.int32)), "lengths must be"),
        (dict(lengths=np.zeros((2,), np.float32)), "lengths must be integers"),
        (dict(cache=np.zeros((3, 8, 49))), "3 rows for a batch of 2"),
        (dict(block_table=np.zeros((3, 2), np.int32)), "block_table must be"),
        (dict(v_head_dim=64), "v_head_dim=64"),
    ],
)
def test_decode_bad_input_is_named(change, match):
    args = dict(
        q=np.zeros((2, 1, 4, 49)),
        cache=np.zeros((2, 8, 49)),
        lengths=np.zeros((2,), np.int32),
        block_table=None,
        v_head_dim=32,
    )
    args.update(change)
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        mla_attention.mla_decode(
            args.pop("q"), args.pop("cache"), args.pop("lengths"), softmax_scale=1.0, implementation="xla", **args
        )


# -- prefill ------------------------------------------------------------------------------------
PREFILL_CONFIG = ((32, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))  # q/k blocks of unequal size


def _prefill_inputs(rng, batch, t, heads, d, dv):
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return mk(batch, t, heads, d), mk(batch, t, heads, d), mk(batch, t, heads, dv), mk(batch, t, heads, dv)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_forward_and_grads(causal):
    """t = 37 is a multiple of neither block; d = 48 is split 32 + 16 like 192 = 128 + 64."""
    rng = np.random.default_rng(11)
    q, k, v, do = _prefill_inputs(rng, 2, 37, 2, 48, 32)

    def loss(impl):
        def f(q, k, v):
            o = mla_attention.mla_prefill(
                q, k, v, softmax_scale=0.2, causal=causal, implementation=impl, config=PREFILL_CONFIG
            )
            return jnp.sum(o * do), o

        return jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (dq, dk, dv), o = loss("pallas_interpret")
    (dq_r, dk_r, dv_r), o_r = loss("reference")
    assert _rel(o, o_r) < 1e-5
    for g, g_r in ((dq, dq_r), (dk, dk_r), (dv, dv_r)):
        assert _rel(g, g_r) < 1e-5


def test_prefill_192_128_and_xla():
    """The real head dims through the kernel (forward), and the XLA form against the reference."""
    rng = np.random.default_rng(12)
    q, k, v, _ = _prefill_inputs(rng, 1, 20, 1, 192, 128)
    ref = mla_attention.mla_prefill_reference(q, k, v, softmax_scale=0.1)
    out = mla_attention.mla_prefill(
        q, k, v, softmax_scale=0.1, implementation="pallas_interpret", config=((16, 16, 4, 1),) * 3
    )
    assert _rel(out, ref) < 1e-5
    assert _rel(mla_attention.mla_prefill(q, k, v, softmax_scale=0.1), ref) < 1e-5  # auto = xla on CPU
    with pytest.raises(ValueError, match="mla_prefill needs"):
        mla_attention.mla_prefill(q, k[:, :10], v, softmax_scale=0.1)
