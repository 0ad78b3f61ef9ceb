"""Grouped matmul: the kernel behind every MoE expert matmul.

Rows of `lhs` are sorted by group; group g (group_sizes[g] rows, possibly zero) is multiplied by
`rhs[g]`. Rows past sum(group_sizes) are zero in the output.

    out = gmm(lhs, rhs, group_sizes)                          # [m, k] x [g, k, n] -> [m, n]
    out = gmm(lhs, w_int8, group_sizes, rhs_scale=scale)      # weight-only int8, scale [g, 1, n]
    out = gmm(lhs, w_fp8, group_sizes, rhs_scale=blocks, rhs_scale_block=(128, 128))  # fp8, [g, k/128, n/128]
    out = gmm_fp8(x8, x_scale, w_fp8, blocks, group_sizes)    # float8 x in 1 x 128 tiles, float32 out
    dw = tgmm(lhs, grad, group_sizes, num_groups=g)           # [g, k, n]: lhs_g^T @ grad_g

Backends (`implementation=`): "pallas_gpu" (Triton lowering), "pallas_tpu" (Mosaic, megablox-style),
"pallas_interpret" (the GPU kernel in interpret mode; CPU tests), "xla" (`jax.lax.ragged_dot`),
"reference" (a loop over groups in plain jnp), "mosaic_gpu" / "mosaic_interpret" (the Pallas Mosaic GPU
kernel where there is one, `gmm_fp8` of K-major 128 x 128 blocks, and the Triton kernels elsewhere;
not yet measured, so "auto" does not pick it). None/"auto" picks by `jax.default_backend()`:
gpu -> pallas_gpu, tpu -> pallas_tpu, anything else -> xla (interpret mode is far too slow for
model tests). The environment variable VISHWAM_GMM_IMPL (e.g. `reference`) replaces "auto"
everywhere, so a whole model can be switched to another backend without touching its code; an
explicit `implementation=` argument still wins.

Quantized weights (vishwam_jax/quantization) compute exactly `lhs @ dequantized(rhs)`:
- int8 per output channel: the scale multiplies the float32 accumulator of each output tile,
  without ever writing a dequantised copy of the weights (every backend).
- fp8 (float8 e4m3) with float32 block scales `rhs_scale` [g, ceil(r/b0), ceil(c/b1)] over the
  last two dimensions of rhs *as stored* ([k, n], or [n, k] with transpose_rhs), DeepSeek-V3's
  layout: the reference dequantizes each group's matrix in float32; the GPU kernel
  (`_gmm_gpu.gmm_block_scaled`) reads the float8 bytes and scales each K block's float32 partial
  product; XLA and the TPU kernel take the weights dequantized to the activation dtype (one fused
  pass).
- `gmm_fp8`: both operands float8 (lhs in 1 x 128 tiles along K), for FP8 training and prefill:
  Hopper's FP8 tensor cores in the GPU kernel, dequantized float32 products elsewhere.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels import _gmm_fp8_mgpu, _gmm_gpu
from vishwam_jax.quantization import is_storage_dtype
from vishwam_jax.quantization.formats import dequantize

IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "pallas_interpret", "xla", "reference", "mosaic_gpu", "mosaic_interpret")
# What a Mosaic GPU choice runs where only the Triton kernels exist.
_TRITON_FOR_MOSAIC = {"mosaic_gpu": "pallas_gpu", "mosaic_interpret": "pallas_interpret"}
ENV_VAR = "VISHWAM_GMM_IMPL"


def resolve_implementation(implementation: str | None = None, *, mosaic: bool = False) -> str:
    """The backend a call will use: explicit argument, else $VISHWAM_GMM_IMPL, else by platform.
    mosaic: the caller has a Mosaic GPU kernel; without one, "mosaic_*" resolves to its Triton twin."""
    impl = implementation if implementation not in (None, "auto") else os.environ.get(ENV_VAR) or "auto"
    if impl == "auto":
        platform = jax.default_backend()
        impl = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "xla")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown grouped-matmul implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    return impl if mosaic else _TRITON_FOR_MOSAIC.get(impl, impl)


def has_block_scaled_kernel(block: tuple[int, int], implementation: str | None = None) -> bool:
    """Whether the backend multiplies float8 operands in `block`s as stored (the GPU kernels, also in
    interpret mode), rather than dequantizing them first. A call whose operands the kernels cannot
    address (`_gmm_gpu.block_scaled_takes`) is dequantized all the same."""
    impl = resolve_implementation(implementation)
    return impl in ("pallas_gpu", "pallas_interpret") and _gmm_gpu.supports_block(block)


# ---------------------------------------------------------------------------------------------
# Shape helpers


def _out_features(rhs: Array, transpose_rhs: bool) -> int:
    return rhs.shape[1] if transpose_rhs else rhs.shape[2]


def _scale_2d(rhs_scale: Array | None, rhs: Array, transpose_rhs: bool) -> Float[Array, "g n"] | None:
    """Accept [g, 1, n], [g, n, 1] (natural for a transposed rhs) or [g, n]; return float32 [g, n]."""
    if rhs_scale is None:
        return None
    g, n = rhs.shape[0], _out_features(rhs, transpose_rhs)
    if rhs_scale.size != g * n:
        raise ValueError(f"rhs_scale of shape {rhs_scale.shape} is not per output channel of rhs {rhs.shape}")
    return rhs_scale.reshape(g, n).astype(jnp.float32)


def _block_scales(rhs_scale: Array, rhs: Array, block: tuple[int, int]) -> Float[Array, "g rb cb"]:
    """Block scales of rhs's last two dimensions as stored: [g, ceil(rows/b0), ceil(cols/b1)], float32."""
    expected = (rhs.shape[0], -(-rhs.shape[1] // block[0]), -(-rhs.shape[2] // block[1]))
    if tuple(rhs_scale.shape) != expected:
        raise ValueError(f"rhs_scale of shape {rhs_scale.shape} is not {block} blocks of rhs {rhs.shape} ({expected})")
    return rhs_scale.astype(jnp.float32)


def _dequantized(rhs: Array, scale: Array, block: tuple[int, int], dtype) -> Array:
    """rhs * its block scales in float32, then `dtype` (blocks over each group's stored matrix)."""
    return dequantize(rhs, scale, "fp8", (1, 1), block, dtype)


def _check(lhs: Array, rhs: Array, group_sizes: Array, transpose_rhs: bool, rhs_scale: Array | None) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"expected lhs [m, k], rhs [g, k, n], group_sizes [g]; got {lhs.shape}, {rhs.shape}, {group_sizes.shape}"
        )
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"shape mismatch: lhs {lhs.shape}, rhs {rhs.shape} (transpose_rhs={transpose_rhs}), "
            f"group_sizes {group_sizes.shape}"
        )
    if is_storage_dtype(rhs.dtype) and rhs_scale is None:
        raise ValueError(f"quantized ({rhs.dtype}) rhs needs rhs_scale")


def row_groups(group_sizes: Int[Array, " g"], m: int) -> Int[Array, " m"]:
    """Group of every row; rows past sum(group_sizes) get g (one past the last group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right", method="compare_all").astype(jnp.int32)


def _row_scales(scale: Float[Array, "g n"], group_sizes: Int[Array, " g"], m: int) -> Float[Array, "m n"]:
    """Each row's group scale (zeros past sum(group_sizes))."""
    padded = jnp.concatenate([scale, jnp.zeros((1, scale.shape[1]), scale.dtype)])
    return padded[row_groups(group_sizes, m)]


# ---------------------------------------------------------------------------------------------
# References (plain jnp; one masked dense product per group, so O(g) work, but no [m, k, n] or
# one-hot [m, g] intermediates)


def gmm_reference(
    lhs: Float[Array, "m k"],
    rhs: Array,
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    rhs_scale: Array | None = None,
    rhs_scale_block: tuple[int, int] | None = None,
    preferred_element_type=None,
) -> Float[Array, "m n"]:
    _check(lhs, rhs, group_sizes, transpose_rhs, rhs_scale)
    m, g, n = lhs.shape[0], rhs.shape[0], _out_features(rhs, transpose_rhs)
    blocks = None if rhs_scale_block is None else _block_scales(rhs_scale, rhs, rhs_scale_block)
    scale = None if blocks is not None else _scale_2d(rhs_scale, rhs, transpose_rhs)
    starts, ends = _gmm_gpu.group_bounds(group_sizes, m)
    rows = jnp.arange(m)
    x = lhs.astype(jnp.float32)

    def one_group(i, acc):
        if blocks is not None:
            w = _dequantized(rhs[i], blocks[i], rhs_scale_block, jnp.float32)
        else:
            w = rhs[i].astype(jnp.float32)
        w = w.T if transpose_rhs else w
        if scale is not None:
            w = w * scale[i][None, :]
        y = jnp.dot(x, w, precision=lax.Precision.HIGHEST)
        mine = (rows >= starts[i]) & (rows < ends[i])
        return acc + jnp.where(mine[:, None], y, 0.0)

    out = lax.fori_loop(0, g, one_group, jnp.zeros((m, n), jnp.float32))
    return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    num_groups: int,
    preferred_element_type=None,
) -> Float[Array, "g k n"]:
    m = lhs.shape[0]
    starts, ends = _gmm_gpu.group_bounds(group_sizes, m)
    rows = jnp.arange(m)
    x, dy = lhs.astype(jnp.float32), grad.astype(jnp.float32)

    def one_group(_, i):
        mine = (rows >= starts[i]) & (rows < ends[i])
        return None, jnp.dot(jnp.where(mine[:, None], x, 0.0).T, dy, precision=lax.Precision.HIGHEST)

    _, out = lax.scan(one_group, None, jnp.arange(num_groups))
    return out.astype(preferred_element_type or lhs.dtype)


# ---------------------------------------------------------------------------------------------
# Backend dispatch (no autodiff here; see the custom_vjp below)


def _gmm_forward(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype, impl, block=None):
    """scale: None, per output channel [g, n], or (with `block`) block scales over rhs as stored."""
    if impl == "reference":
        return gmm_reference(
            lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, rhs_scale=scale, rhs_scale_block=block,
            preferred_element_type=out_dtype,
        )  # fmt: skip
    if block is not None:
        if has_block_scaled_kernel(block, impl) and _gmm_gpu.block_scaled_takes(lhs, rhs, transpose_rhs):
            return _gmm_gpu.gmm_block_scaled(
                lhs, rhs, group_sizes, scale, block=block, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                interpret=impl == "pallas_interpret",
            )  # fmt: skip
        # XLA and the TPU kernel take the weights dequantized to the activation dtype (one fused pass).
        rhs, scale = _dequantized(rhs, scale, block, lhs.dtype), None
    if impl == "xla":
        return _gmm_xla(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype)
    if impl == "pallas_tpu":
        from vishwam_jax.pallas_kernels import _gmm_tpu

        return _gmm_tpu.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, rhs_scale=scale, out_dtype=out_dtype)
    return _gmm_gpu.gmm(
        lhs,
        rhs,
        group_sizes,
        transpose_rhs=transpose_rhs,
        rhs_scale=scale,
        out_dtype=out_dtype,
        interpret=impl == "pallas_interpret",
    )


def _gmm_xla(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype):
    """`jax.lax.ragged_dot`; int8 weights are converted inside the dot and scaled per row afterwards."""
    if transpose_rhs:
        rhs = rhs.swapaxes(1, 2)
    if scale is None:
        return lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
    acc = lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes, preferred_element_type=jnp.float32)
    return (acc * _row_scales(scale, group_sizes, lhs.shape[0])).astype(out_dtype)


def _tgmm_forward(lhs, grad, group_sizes, num_groups, out_dtype, impl):
    if impl == "reference":
        return tgmm_reference(lhs, grad, group_sizes, num_groups=num_groups, preferred_element_type=out_dtype)
    if impl == "xla":
        dims = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
        )
        return lax.ragged_dot_general(lhs, grad, group_sizes, dims, preferred_element_type=out_dtype)
    if impl == "pallas_tpu":
        from vishwam_jax.pallas_kernels import _gmm_tpu

        return _gmm_tpu.tgmm(lhs, grad, group_sizes, out_dtype=out_dtype)
    return _gmm_gpu.tgmm(lhs, grad, group_sizes, out_dtype=out_dtype, interpret=impl == "pallas_interpret")


# ---------------------------------------------------------------------------------------------
# Differentiable entry points


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype, impl, block):
    return _gmm_forward(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype, impl, block)


def _gmm_fwd(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype, impl, block):
    out = _gmm_forward(lhs, rhs, group_sizes, scale, transpose_rhs, out_dtype, impl, block)
    return out, (lhs, rhs, group_sizes, scale)


def _gmm_bwd(transpose_rhs, out_dtype, impl, block, residuals, grad):
    lhs, rhs, group_sizes, scale = residuals
    if block is not None:
        # Block scales are defined on rhs as stored, so the transposed product takes them unchanged.
        grad_lhs = _gmm_forward(grad, rhs, group_sizes, scale, not transpose_rhs, lhs.dtype, impl, block)
        return grad_lhs, None, None, jnp.zeros_like(scale)
    if scale is not None:
        # d lhs = grad @ (rhs * scale)^T = (grad * scale[group of row]) @ rhs^T: the scale moves onto
        # the contracted axis, so apply it to the (small) gradient rows instead of the weights.
        grad = (grad.astype(jnp.float32) * _row_scales(scale, group_sizes, lhs.shape[0])).astype(lhs.dtype)
    grad_lhs = _gmm_forward(grad, rhs, group_sizes, None, not transpose_rhs, lhs.dtype, impl)
    if is_storage_dtype(rhs.dtype):
        grad_rhs = None  # frozen quantised weights
    elif transpose_rhs:  # rhs is [g, n, k]: grad_g^T @ lhs_g directly, no transpose pass over the weights
        grad_rhs = _tgmm_forward(grad, lhs, group_sizes, rhs.shape[0], rhs.dtype, impl)
    else:
        grad_rhs = _tgmm_forward(lhs, grad, group_sizes, rhs.shape[0], rhs.dtype, impl)
    grad_scale = None if scale is None else jnp.zeros_like(scale)
    return grad_lhs, grad_rhs, None, grad_scale


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Float[Array, "g k n"] | Array,
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    rhs_scale: Float[Array, "g 1 n"] | Float[Array, "g rb cb"] | None = None,
    rhs_scale_block: tuple[int, int] | None = None,
    preferred_element_type=None,
    implementation: str | None = None,
) -> Float[Array, "m n"]:
    """Grouped matmul: rows [start_g, end_g) of `lhs` times rhs[g]; rows past sum(group_sizes) are zero.

    rhs: [g, k, n], or [g, n, k] with transpose_rhs. A quantized (int8 or float8) rhs needs `rhs_scale`:
    per output channel ([g, 1, n], [g, n, 1] or [g, n]), or with `rhs_scale_block` = (b0, b1) one scale
    per b0 x b1 block of each group's matrix as stored ([g, ceil(rows/b0), ceil(cols/b1)], partial edge
    blocks). Quantized weights are frozen (no gradient).
    Accumulation is float32; the output dtype is `preferred_element_type` (default lhs.dtype).
    Differentiable in lhs and (float) rhs: the gradients are a gmm and a tgmm on the same backend.
    """
    _check(lhs, rhs, group_sizes, transpose_rhs, rhs_scale)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if rhs_scale_block is None:
        scale, block = _scale_2d(rhs_scale, rhs, transpose_rhs), None
    else:
        block = (int(rhs_scale_block[0]), int(rhs_scale_block[1]))
        scale = _block_scales(rhs_scale, rhs, block)
    impl = resolve_implementation(implementation)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), scale, transpose_rhs, out_dtype, impl, block)


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    num_groups: int | None = None,
    preferred_element_type=None,
    implementation: str | None = None,
) -> Float[Array, "g k n"]:
    """Per group lhs_g^T @ grad_g (the weight gradient of gmm); empty groups give zeros and rows past
    sum(group_sizes) are ignored. Output dtype `preferred_element_type` (default lhs.dtype)."""
    g = group_sizes.shape[0]
    if num_groups is not None and num_groups != g:
        raise ValueError(f"num_groups={num_groups} but group_sizes has {g} entries")
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"expected lhs [m, k] and grad [m, n]; got {lhs.shape}, {grad.shape}")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    impl = resolve_implementation(implementation)
    return _tgmm_forward(lhs, grad, group_sizes.astype(jnp.int32), g, out_dtype, impl)


def gmm_fp8(
    lhs: Array,
    lhs_scale: Float[Array, "m kb"],
    rhs: Array,
    rhs_scale: Float[Array, "g rb cb"],
    group_sizes: Int[Array, " g"],
    *,
    rhs_scale_block: tuple[int, int] = (128, 128),
    transpose_rhs: bool = False,
    preferred_element_type=jnp.float32,
    implementation: str | None = None,
) -> Float[Array, "m n"]:
    """`gmm` of two float8 operands (no autodiff: FP8 training's custom rules call it).

    lhs [m, k] float8 with lhs_scale [m, ceil(k / b_k)]: one scale per row and b_k columns, b_k being
    the weight block's K side; rhs and rhs_scale as `gmm`'s block-scaled weights. The GPU kernel
    multiplies the float8 tiles on the tensor cores and scales each K block's float32 partial sum by
    both scales; the other backends dequantize both operands to float32 and multiply those (the same
    products, the reference). Give the weights K-major (`[g, n, k]` with transpose_rhs=True, as the
    models store them): FP8 wgmma reads that layout as stored, and a `[g, k, n]` tile is loaded and
    transposed synchronously at every K step. implementation="mosaic_gpu" runs the warp-specialized
    Mosaic GPU kernel (`_gmm_fp8_mgpu`) on K-major weights in 128 x 128 blocks (N a multiple of 64),
    and the Triton kernel on the others."""
    _check(lhs, rhs, group_sizes, transpose_rhs, rhs_scale)
    block = (int(rhs_scale_block[0]), int(rhs_scale_block[1]))
    scale = _block_scales(rhs_scale, rhs, block)
    block_k = block[1] if transpose_rhs else block[0]
    m, k = lhs.shape
    if tuple(lhs_scale.shape) != (m, -(-k // block_k)):
        raise ValueError(f"lhs_scale of shape {lhs_scale.shape} is not 1 x {block_k} tiles of lhs {lhs.shape}")
    out_dtype = jnp.dtype(preferred_element_type)
    impl = resolve_implementation(implementation, mosaic=True)
    group_sizes = group_sizes.astype(jnp.int32)
    if impl in _TRITON_FOR_MOSAIC:
        if _gmm_fp8_mgpu.supported(lhs.shape, rhs.shape, block, transpose_rhs):
            return _gmm_fp8_mgpu.gmm_fp8_mgpu(
                lhs, lhs_scale, rhs, scale, group_sizes, out_dtype=out_dtype, interpret=impl == "mosaic_interpret"
            )
        impl = _TRITON_FOR_MOSAIC[impl]
    if has_block_scaled_kernel(block, impl) and _gmm_gpu.block_scaled_takes(lhs, rhs, transpose_rhs):
        return _gmm_gpu.gmm_block_scaled(
            lhs, rhs, group_sizes, scale, block=block, lhs_scale=lhs_scale, transpose_rhs=transpose_rhs,
            out_dtype=out_dtype, interpret=impl == "pallas_interpret",
        )  # fmt: skip
    x = dequantize(lhs, lhs_scale, "fp8", (1, 1), (1, block_k), jnp.float32)
    w = _dequantized(rhs, scale, block, jnp.float32)
    if rhs.shape[0] == 1 and impl != "reference":  # one group (a dense layer): a plain matmul
        w = w[0].T if transpose_rhs else w[0]
        rows = jnp.arange(m) < group_sizes[0]
        return jnp.where(rows[:, None], jnp.dot(x, w, preferred_element_type=jnp.float32), 0).astype(out_dtype)
    return _gmm_forward(x, w, group_sizes, None, transpose_rhs, out_dtype, impl)


def tgmm_fp8(
    lhs: Array,
    lhs_scale: Float[Array, "mt k"],
    grad: Array,
    grad_scale: Float[Array, "mt n"],
    group_sizes: Int[Array, " g"],
    *,
    tile: int = 128,
    tokens_last: bool = False,
    preferred_element_type=jnp.float32,
    implementation: str | None = None,
) -> Float[Array, "g k n"]:
    """`tgmm` of two float8 operands in `tile` x 1 token tiles (scales [ceil(m / tile), columns] over
    global row tiles): FP8 training's weight gradient. The GPU kernel runs the tiles on the FP8
    tensor cores; the other backends dequantize both to float32 (the same products).

    tokens_last: lhs is given as [k, m] and grad as [n, m] (scales unchanged), the layout in which
    FP8 wgmma can read the contracted tokens as stored; the GPU kernel streams it, where [m, k]
    tiles are loaded synchronously and transposed at every step."""
    columns = (lhs.shape[0], grad.shape[0]) if tokens_last else (lhs.shape[1], grad.shape[1])
    m = lhs.shape[-1] if tokens_last else lhs.shape[0]
    tiles = -(-m // tile)
    if tuple(lhs_scale.shape) != (tiles, columns[0]) or tuple(grad_scale.shape) != (tiles, columns[1]):
        raise ValueError(
            f"scales {lhs_scale.shape}, {grad_scale.shape} are not {tile} x 1 tiles of {lhs.shape}, {grad.shape}"
            + (" (tokens last)" if tokens_last else "")
        )
    impl = resolve_implementation(implementation)
    group_sizes = group_sizes.astype(jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type)
    addressable = not (_gmm_gpu.byte_offsets_overflow(lhs) or _gmm_gpu.byte_offsets_overflow(grad))
    if has_block_scaled_kernel((tile, tile), impl) and addressable:
        return _gmm_gpu.tgmm_fp8(
            lhs, lhs_scale, grad, grad_scale, group_sizes, tile=tile, tokens_last=tokens_last, out_dtype=out_dtype,
            interpret=impl == "pallas_interpret",
        )  # fmt: skip
    if tokens_last:
        lhs, grad = lhs.T, grad.T
    x = dequantize(lhs, lhs_scale, "fp8", (1, 1), (tile, 1), jnp.float32)
    dy = dequantize(grad, grad_scale, "fp8", (1, 1), (tile, 1), jnp.float32)
    if group_sizes.shape[0] == 1 and impl != "reference":  # one group (a dense layer): a plain matmul
        rows = jnp.arange(m) < group_sizes[0]
        return jnp.dot(jnp.where(rows[:, None], x, 0).T, dy, preferred_element_type=jnp.float32)[None].astype(out_dtype)
    return _tgmm_forward(x, dy, group_sizes, group_sizes.shape[0], out_dtype, impl)
