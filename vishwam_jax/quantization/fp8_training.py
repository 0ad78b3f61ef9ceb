"""FP8 training matmuls: DeepSeek-V3's fine-grained recipe (DeepSeek-V3 report, §3.3).

Every GEMM of a linear layer and of the experts takes float8 e4m3 operands with float32 scales over
small tiles, accumulates in float32, and keeps its output in the compute dtype:

    forward   y  = x @ w      x in 1 x 128 tiles (per token, along the contracted features),
                              w in 128 x 128 blocks
    dgrad     dx = dy @ w^T   dy in 1 x 128 tiles along its features, w in the same blocks
    wgrad     dw = x^T @ dy   x and dy in 128 x 1 tiles (along the tokens, now contracted)

A tile's scale is its amax / 448 (e4m3's largest finite value), so one outlier costs precision only
within its own 128 values; master weights, optimizer state, norms, attention scores, the router and
the output head stay in float32 / the compute dtype.

The GEMMs are `grouped_matmul.gmm_fp8` (forward, dgrad) and `grouped_matmul.tgmm_fp8` (wgrad), one
group for a dense layer: on a GPU the Pallas kernels feed the float8 tiles to Hopper's FP8 tensor
cores and scale each 128-wide block of the contracted axis's float32 partial sum; elsewhere both
operands are dequantized and multiplied in float32 (the same products).

`fp8_matmuls()` turns it on while a model is traced (`StepConfig.fp8`, `scripts/train.py --fp8`);
`layers.linear` and `moe.grouped_linear` consult `fp8_active()`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vishwam_jax.quantization.formats import dequantize, quantize

TILE = 128
ACTIVATION_TILE = (1, TILE)  # per row, along the contracted features
WEIGHT_BLOCK = (TILE, TILE)
TOKEN_TILE = (TILE, 1)  # along the rows: the contracted axis of a weight gradient

_ACTIVE = contextvars.ContextVar("vishwam_fp8_matmuls", default=False)


@contextlib.contextmanager
def fp8_matmuls() -> Iterator[None]:
    """Linear layers and experts traced inside this block compute their GEMMs in FP8 (this module).

    A trace-time switch: jit's cache does not see it, so a jitted function traced once outside the
    block is not retraced inside it. Build the jitted function for one setting (the train step
    does: `StepConfig.fp8` is fixed when `make_train_step` builds it)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def fp8_active() -> bool:
    return _ACTIVE.get()


def as_fp8(x: Float[Array, "*batch m n"], tile: tuple[int, int]) -> Float[Array, "*batch m n"]:
    """The float32 values of `x` after e4m3 quantization with one scale per `tile` of its last two
    axes (partial edge tiles have their own scale); leading axes are a batch (experts)."""
    values, scale = quantize(x, "fp8", (1, 1), tile)
    return dequantize(values, scale, "fp8", (1, 1), tile, jnp.float32)


def _gmm_fp8(x, w, group_sizes, transpose_w: bool = False) -> Float[Array, "m n"]:
    """x (1 x 128 tiles along its last axis) times w [g, a, b] (128 x 128 blocks of each matrix as
    stored; transpose_w: times w[g]^T), both float8, float32 out.

    The float8 weight is always laid out with the contracted axis last: FP8 wgmma reads both operands
    K-major from shared memory, and Triton loads a tile whose bytes run along N synchronously and
    transposes it at every K step, with no copy in flight (the compiled kernel's TTGIR). The weight
    is quantized at every step anyway, so the forward's transpose rides in that same pass; the
    blocks and scales are the same ones."""
    from vishwam_jax.pallas_kernels import grouped_matmul  # local: kernels import nothing from here

    x8, x_scale = quantize(x, "fp8", (1, 1), ACTIVATION_TILE)
    k_major = w if transpose_w else jnp.swapaxes(w, -1, -2)
    block = WEIGHT_BLOCK if transpose_w else WEIGHT_BLOCK[::-1]
    w8, w_scale = quantize(k_major, "fp8", (1, 1), block)
    return grouped_matmul.gmm_fp8(x8, x_scale, w8, w_scale, group_sizes, rhs_scale_block=block, transpose_rhs=True)


def _wgrad_fp8(x, dy, group_sizes) -> Float[Array, "g a b"]:
    """Per group x_g^T @ dy_g, both float8 in 128 x 1 tiles along the rows (the contracted axis).

    Both are quantized straight into [features, tokens], the contracted tokens last, which is how FP8
    wgmma reads them (the same tiles and scales as quantizing [tokens, features])."""
    from vishwam_jax.pallas_kernels import grouped_matmul

    (x8, x_scale), (dy8, dy_scale) = (quantize(a.T, "fp8", (1, 1), TOKEN_TILE[::-1]) for a in (x, dy))
    return grouped_matmul.tgmm_fp8(x8, x_scale.T, dy8, dy_scale.T, group_sizes, tile=TOKEN_TILE[0], tokens_last=True)


def _one_group(x: Array) -> Int[Array, "1"]:
    return jnp.full((1,), x.shape[0], jnp.int32)


@jax.custom_vjp
def fp8_matmul(x: Float[Array, "m k"], w: Float[Array, "k n"]) -> Float[Array, "m n"]:
    """x @ w with FP8 operands (the recipe above), in x's dtype; gradients by the same recipe."""
    return _gmm_fp8(x, w[None], _one_group(x)).astype(x.dtype)


def _fp8_matmul_fwd(x, w):
    return fp8_matmul(x, w), (x, w)


def _fp8_matmul_bwd(residuals, dy):
    x, w = residuals
    dx = _gmm_fp8(dy, w[None], _one_group(x), transpose_w=True)
    dw = _wgrad_fp8(x, dy, _one_group(x))[0]
    return dx.astype(x.dtype), dw.astype(w.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


@jax.custom_vjp
def fp8_grouped_matmul(
    x: Float[Array, "m a"], w: Float[Array, "g a b"], group_sizes: Int[Array, " g"]
) -> Float[Array, "m b"]:
    """Rows of `x` sorted by group times each group's `w[g]`, FP8 as `fp8_matmul` (each expert's
    matrix in its own 128 x 128 blocks)."""
    return _gmm_fp8(x, w, group_sizes).astype(x.dtype)


def _fp8_grouped_fwd(x, w, group_sizes):
    return fp8_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _fp8_grouped_bwd(residuals, dy):

    x, w, group_sizes = residuals
    dx = _gmm_fp8(dy, w, group_sizes, transpose_w=True)
    # The token tiles run over the sorted rows, so a tile may span two experts' rows; its scale is
    # then shared by the two (DeepSeek's kernels would start a tile at each group boundary).
    dw = _wgrad_fp8(x, dy, group_sizes)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


fp8_grouped_matmul.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
