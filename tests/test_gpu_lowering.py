"""Every Pallas GPU kernel lowers through Pallas' Triton rules on this CPU, for a CUDA target.

Interpret mode runs a kernel's semantics but never its Triton lowering, and an op that the lowering
lacks (a float8 load whose masked lanes take an integer 0, for one) only fails on a GPU. Lowering
needs no GPU; compiling the Triton module does, so that part stays with the GPU benchmarks.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from vishwam_jax.pallas_kernels import grouped_matmul, mla_attention
from vishwam_jax.utils import kernel_inspection

G, K, N = 4, 512, 1024
E4M3 = jnp.float8_e4m3fn


def triton_calls(fn, *args) -> int:
    return kernel_inspection.lower_for_cuda(fn, *args).count("xla.gpu.triton")


def zeros(*shape, dtype=jnp.bfloat16):
    return jnp.zeros(shape, dtype)


def rows(m: int):
    return jnp.full((G,), m // G, jnp.int32)


def _summed(fn):
    return lambda *a: fn(*a).astype(jnp.float32).sum()  # value_and_grad of it keeps the forward kernels too


GMM = dict(implementation="pallas_gpu")


def _gmm_fp8(x, x_scale, w, w_scale, gs):
    return grouped_matmul.gmm_fp8(x, x_scale, w, w_scale, gs, **GMM)


def _gmm_fp8_args(m: int) -> tuple:
    x_and_scale = (zeros(m, K, dtype=E4M3), zeros(m, K // 128, dtype=jnp.float32))
    return (*x_and_scale, zeros(G, K, N, dtype=E4M3), zeros(G, K // 128, N // 128, dtype=jnp.float32), rows(m))


CASES = {
    # name: (function, arguments, Triton calls at least)
    "gmm bf16, decode": (
        lambda x, w, gs: grouped_matmul.gmm(x, w, gs, **GMM),
        (zeros(8, K), zeros(G, K, N), rows(8)),
        1,
    ),
    "gmm bf16, forward and both gradients": (
        jax.value_and_grad(_summed(lambda x, w, gs: grouped_matmul.gmm(x, w, gs, **GMM)), argnums=(0, 1)),
        (zeros(512, K), zeros(G, K, N), rows(512)),
        3,
    ),
    "gmm int8 weights": (
        lambda x, w, s, gs: grouped_matmul.gmm(x, w, gs, rhs_scale=s, **GMM),
        (zeros(8, K), zeros(G, K, N, dtype=jnp.int8), zeros(G, 1, N, dtype=jnp.float32), rows(8)),
        1,
    ),
    "gmm fp8 weights [k, n], forward and lhs gradient": (
        jax.value_and_grad(
            _summed(lambda x, w, s, gs: grouped_matmul.gmm(x, w, gs, rhs_scale=s, rhs_scale_block=(128, 128), **GMM))
        ),
        (zeros(8, K), zeros(G, K, N, dtype=E4M3), zeros(G, K // 128, N // 128, dtype=jnp.float32), rows(8)),
        2,
    ),
    "fp8 dense projection, batch 1 (K split over programs)": (
        lambda x, w, s, gs: grouped_matmul.gmm(x, w, gs, rhs_scale=s, rhs_scale_block=(128, 128), **GMM),
        (
            zeros(1, 7168),
            zeros(1, 7168, 1536, dtype=E4M3),
            zeros(1, 56, 12, dtype=jnp.float32),
            jnp.ones((1,), jnp.int32),
        ),
        1,
    ),
    "gmm fp8 weights [n, k]": (
        lambda x, w, s, gs: grouped_matmul.gmm(
            x, w, gs, rhs_scale=s, rhs_scale_block=(128, 128), transpose_rhs=True, **GMM
        ),
        (zeros(8, K), zeros(G, N, K, dtype=E4M3), zeros(G, N // 128, K // 128, dtype=jnp.float32), rows(8)),
        1,
    ),
    "gmm_fp8 (both operands float8)": (_gmm_fp8, _gmm_fp8_args(512), 1),
    "gmm_fp8, decode (a few rows per expert)": (_gmm_fp8, _gmm_fp8_args(8), 1),
    "tgmm_fp8": (
        lambda x, xs, dy, dys, gs: grouped_matmul.tgmm_fp8(x, xs, dy, dys, gs, **GMM),
        (
            zeros(512, K, dtype=E4M3),
            zeros(512 // 128, K, dtype=jnp.float32),
            zeros(512, N, dtype=E4M3),
            zeros(512 // 128, N, dtype=jnp.float32),
            rows(512),
        ),
        1,
    ),
    "tgmm_fp8, tokens last": (
        lambda x, xs, dy, dys, gs: grouped_matmul.tgmm_fp8(x, xs, dy, dys, gs, tokens_last=True, **GMM),
        (
            zeros(K, 512, dtype=E4M3),
            zeros(512 // 128, K, dtype=jnp.float32),
            zeros(N, 512, dtype=E4M3),
            zeros(512 // 128, N, dtype=jnp.float32),
            rows(512),
        ),
        1,
    ),
    "mla decode, paged": (
        lambda q, c, n, t: mla_attention.mla_decode(
            q, c, n, softmax_scale=0.1, block_table=t, implementation="pallas_gpu"
        )[0],
        (zeros(2, 1, 16, 576), zeros(8, 64, 576), jnp.array([70, 5], jnp.int32), jnp.zeros((2, 4), jnp.int32)),
        1,
    ),
    "mla prefill, forward and gradients": (
        jax.value_and_grad(
            _summed(lambda q, k, v: mla_attention.mla_prefill(q, k, v, softmax_scale=0.1, implementation="pallas_gpu")),
            argnums=(0, 1, 2),
        ),
        (zeros(1, 128, 4, 192), zeros(1, 128, 4, 192), zeros(1, 128, 4, 128)),
        3,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers_for_a_gpu(name):
    fn, args, at_least = CASES[name]
    assert triton_calls(fn, *args) >= at_least


def test_fp8_training_gemms_lower_to_the_kernels(monkeypatch):
    """FP8 training's dense and grouped GEMMs, forward and backward, all on Triton kernels."""
    from vishwam_jax.quantization import fp8_training

    monkeypatch.setenv(grouped_matmul.ENV_VAR, "pallas_gpu")
    x = zeros(256, K)
    dense = jax.value_and_grad(_summed(fp8_training.fp8_matmul), argnums=(0, 1))
    assert triton_calls(dense, x, zeros(K, N, dtype=jnp.float32)) >= 3
    sizes = jnp.array([100, 0, 56, 100], jnp.int32)
    grouped = jax.value_and_grad(_summed(lambda x, w: fp8_training.fp8_grouped_matmul(x, w, sizes)), argnums=(0, 1))
    assert triton_calls(grouped, x, zeros(G, K, N, dtype=jnp.float32)) >= 3


def test_fp8_training_gemms_lower_to_the_mosaic_kernel(monkeypatch):
    """With VISHWAM_GMM_IMPL=mosaic_gpu, FP8 training's forward and dgrad products (dense and grouped)
    lower to the Mosaic GPU kernel, and the weight gradients stay on the Triton kernel."""
    from vishwam_jax.quantization import fp8_training

    monkeypatch.setenv(grouped_matmul.ENV_VAR, "mosaic_gpu")
    x = zeros(256, K)
    sizes = jnp.array([100, 0, 56, 100], jnp.int32)
    steps = {
        "dense": (jax.value_and_grad(_summed(fp8_training.fp8_matmul), argnums=(0, 1)), zeros(K, N, dtype=jnp.float32)),
        "grouped": (
            jax.value_and_grad(_summed(lambda x, w: fp8_training.fp8_grouped_matmul(x, w, sizes)), argnums=(0, 1)),
            zeros(G, K, N, dtype=jnp.float32),
        ),
    }
    for name, (fn, w) in steps.items():
        text = kernel_inspection.lower_for_cuda(fn, x, w)
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 2, name  # forward, dgrad
        assert text.count("xla.gpu.triton") >= 1, name  # wgrad


@pytest.mark.parametrize(
    "m, k, n, g", [(16384, 7168, 4096, 32), (8192, 2048, 7168, 256)], ids=["DeepSeek-V3 up", "256 experts, > 2**31"]
)
def test_mosaic_fp8_gmm_lowers_for_hopper(m, k, n, g):
    """The Mosaic GPU fp8 x fp8 kernel through Mosaic GPU's own lowering for a Hopper target: TMA
    boxes, wgmma shapes, layouts and the shared-memory budget (which a fifth TMA stage would exceed).
    256 experts' weights pass 2**31 bytes, which TMA's per-dimension coordinates address."""
    from vishwam_jax.pallas_kernels import _gmm_fp8_mgpu

    shapes = ((m, k), (m, k // 128), (g, n, k), (g, n // 128, k // 128), (g,))
    dtypes = (E4M3, jnp.float32, E4M3, jnp.float32, jnp.int32)
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in zip(shapes, dtypes)]
    assert g * n * k > 2**31 or g == 32

    def fp8(*a):
        return grouped_matmul.gmm_fp8(*a, transpose_rhs=True, implementation="mosaic_gpu")

    text = kernel_inspection.lower_for_cuda(fp8, *args)
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
    deeper = dataclasses.replace(_gmm_fp8_mgpu.DEFAULT, stages=5)
    with pytest.raises(ValueError, match="shared memory"):
        kernel_inspection.lower_for_cuda(lambda *a: _gmm_fp8_mgpu.gmm_fp8_mgpu(*a, config=deeper), *args)


@pytest.mark.parametrize(
    "name",
    ["gmm_fp8 (both operands float8)", "gmm_fp8, decode (a few rows per expert)", "tgmm_fp8", "tgmm_fp8, tokens last"],
)
def test_fp8_products_may_use_the_fp8_tensor_cores(name):
    """Each float8 dot lets Triton accumulate its own K step imprecisely (max_num_imprecise_acc =
    that step), and spans at least one warpgroup's 64 rows, even for a few rows per expert: Triton
    issues FP8 wgmma only then, and otherwise widens both operands to float16 for the older mma."""
    fn, args, _ = CASES[name]
    modules = kernel_inspection.triton_modules(fn, *args)
    assert modules and all(warps > 0 and stages > 0 for _, _, warps, stages in modules)
    dots = [line for _, text, _, _ in modules for line in text.splitlines() if "tt.dot" in line]
    assert dots and all("maxNumImpreciseAcc = " in line and "f8E4M3FN" in line for line in dots)
    rows = [int(line.split(": tensor<")[1].split("x")[0]) for line in dots]
    assert min(rows) >= 64, dots


@pytest.mark.parametrize("transpose", [False, True], ids=["[g, k, n]", "K-major [g, n, k]"])
@pytest.mark.parametrize("dtype", [jnp.int8, E4M3])
def test_one_byte_weights_read_as_int16_pairs_lower(dtype, transpose, monkeypatch):
    """The int16-pair paths (1-byte weights of 2**31..2**32 elements, forced small here) lower for a
    GPU with int8 and with float8 block-scaled weights: pairs along N of [g, k, n], with the
    interleaving epilogue's float32 products, and pairs along K of K-major [g, n, k], whose products
    all take the activations' bf16 (nothing to interleave)."""
    from vishwam_jax.pallas_kernels import _gmm_gpu

    monkeypatch.setattr(_gmm_gpu, "INT8_PACK_ABOVE", 0)
    x, gs = zeros(8, K), rows(8)
    w = zeros(G, N, K, dtype=dtype) if transpose else zeros(G, K, N, dtype=dtype)
    if dtype == jnp.int8:
        opts = dict(transpose_rhs=transpose)
        scale = zeros(G, N, 1, dtype=jnp.float32) if transpose else zeros(G, 1, N, dtype=jnp.float32)
    else:
        opts = dict(transpose_rhs=transpose, rhs_scale_block=(128, 128))
        scale = zeros(G, *(s // 128 for s in w.shape[1:]), dtype=jnp.float32)
    fn = lambda x, w, s, gs: grouped_matmul.gmm(x, w, gs, rhs_scale=s, **opts, **GMM)  # noqa: E731
    modules = kernel_inspection.triton_modules(fn, x, w, scale, gs)
    assert modules and all("!tt.ptr<i16>" in text for _, text, _, _ in modules)
    dots = [line for _, text, _, _ in modules for line in text.splitlines() if "tt.dot" in line]
    float32_dots = [line for line in dots if "xf32> * tensor" in line]
    assert len(dots) == (2 if transpose else 4) and len(float32_dots) == (0 if transpose else 2), dots
