"""The quantized-weight formats: shapes, axes, quantize and dequantize (numpy or jax.numpy).

The same functions serve the converters (numpy, one tensor at a time on the host) and the models
(jax.numpy, inside jit), so a weight quantized at conversion and one quantized at load are the
same bytes.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Float

FORMATS = ("int8", "fp8")
STORAGE_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
# The largest magnitude each storage type represents: symmetric int8 stops at 127 so that -w and w
# round alike; e4m3fn's largest finite value is 448 (DeepSeek's scale_inv = amax / 448).
_QMAX = {"int8": 127.0, "fp8": 448.0}
# The leaf name of a quantized kernel's scale, beside its `kernel` (a norm's weight is `scale`).
SCALE_NAME = "kernel_scale"
DEFAULT_BLOCK = (128, 128)

# (contracted, outputs): how many of a kernel's trailing dimensions form the rows K and the columns N
# of its matrix; the dimensions before them (stacked layers, experts) are a batch. Kernels are laid
# out [*batch, *contracted, *outputs], e.g. attention's q [d, heads, head_dim] is (1, 2).
MatrixDims = tuple[int, int]


class QuantizationError(ValueError):
    """An unknown format, or a quantized checkpoint read as another format (the message says which)."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise QuantizationError(f"quantization {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def is_storage_dtype(dtype) -> bool:
    """int8 or float8 e4m3: the dtypes quantized values are stored in (never cast at load)."""
    return np.dtype(dtype) in STORAGE_DTYPES.values()


def keeps_stored_dtype(name: str, dtype) -> bool:
    """Leaves a dtype cast must leave alone: quantized values and their float32 scales
    (`name`: the dotted parameter path)."""
    return is_storage_dtype(dtype) or name.rsplit(".", 1)[-1] == SCALE_NAME


ACTIVATION_FORMATS = ("none", "fp8")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a model's matmul weights are stored: a format and, for fp8, the block [rows, columns].

    `activations="fp8"` (fp8 weights only) also quantizes each matmul's input to float8 in 1 x b0
    tiles along K, one scale per tile, so that both operands meet on FP8 tensor cores: DeepSeek-V3's
    own inference numerics. Weight-only ("none") keeps the activations in their float dtype."""

    format: str
    block: tuple[int, int] = DEFAULT_BLOCK
    activations: str = "none"

    def __post_init__(self):
        check_format(self.format)
        if len(self.block) != 2 or min(self.block) < 1:
            raise QuantizationError(f"quantization block must be two positive sizes, got {self.block!r}")
        object.__setattr__(self, "block", (int(self.block[0]), int(self.block[1])))
        if self.activations not in ACTIVATION_FORMATS:
            raise QuantizationError(f"activation quantization {self.activations!r} is not one of none, fp8")
        if self.activations == "fp8" and self.format != "fp8":
            raise QuantizationError(f"fp8 activations need fp8 weights, not {self.format}")

    @classmethod
    def of(cls, config) -> Quantization | None:
        """The config's quantization (None: float weights)."""
        if config.quantization == "none":
            return None
        return cls(config.quantization, tuple(config.quantization_block), config.quantization_activations)

    @property
    def storage_dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.format]


def _split(shape: tuple[int, ...], dims: MatrixDims) -> tuple[tuple[int, ...], int, int]:
    """(batch shape, K, N) of a kernel's matrix view."""
    contracted, outputs = dims
    if contracted < 1 or outputs < 1 or contracted + outputs > len(shape):
        raise QuantizationError(f"matrix dims {dims} do not fit a kernel of shape {shape}")
    nb = len(shape) - contracted - outputs
    return tuple(shape[:nb]), math.prod(shape[nb : nb + contracted]), math.prod(shape[nb + contracted :])


def _swap_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2])


def _check_k_major(dims: MatrixDims) -> None:
    if tuple(dims) != (1, 1):
        raise QuantizationError(
            f"only a kernel with one contracted and one output dimension is stored K-major, not {dims}"
        )


def scale_shape(
    fmt: str, shape: tuple[int, ...], dims: MatrixDims, block: tuple[int, int], *, k_major: bool = False
) -> tuple[int, ...]:
    """int8: the kernel's shape with the contracted dimensions 1; fp8: [*batch, ceil(K/b0), ceil(N/b1)].
    K-major (`shape` [*batch, N, K], see `quantize`): the same scales, their last two dimensions swapped."""
    if k_major:
        _check_k_major(dims)
        return _swap_last(scale_shape(fmt, _swap_last(tuple(shape)), dims, block))
    batch, k, n = _split(tuple(shape), dims)
    if check_format(fmt) == "int8":
        contracted, outputs = dims
        return batch + (1,) * contracted + tuple(shape[len(shape) - outputs :])
    return batch + (-(-k // block[0]), -(-n // block[1]))


def scale_axes(fmt: str, axes: tuple[str | None, ...], dims: MatrixDims) -> tuple[str | None, ...]:
    """Logical axes of a scale: the kernel's (int8: a size-1 dimension is never split); fp8: the batch
    dimensions' names and an unsharded block grid (1/4096 of the weight's bytes, so replicating it
    costs nothing, and no mesh has to divide a count of blocks)."""
    if check_format(fmt) == "int8":
        return tuple(axes)
    return tuple(axes[: len(axes) - sum(dims)]) + (None, None)


def _expand(scale, k: int, n: int, block: tuple[int, int], xp: ModuleType):
    """Block scales [..., Kb, Nb] spread over the [..., K, N] matrix (edge blocks cut)."""
    return xp.repeat(xp.repeat(scale, block[0], axis=-2), block[1], axis=-1)[..., :k, :n]


def quantize(
    w,
    fmt: str,
    dims: MatrixDims,
    block: tuple[int, int] = DEFAULT_BLOCK,
    xp: ModuleType = jnp,
    *,
    k_major: bool = False,
):
    """(values, float32 scale) of the float weight `w` (symmetric, amax over each scale's group).
    `xp`: numpy for host arrays (converters), jax.numpy inside jit.

    k_major: store them K-major (dims (1, 1) only): `w` is the float kernel [*batch, K, N] as ever,
    and its values and scales come back transposed, [*batch, N, K] and [*batch, N, 1] (int8) or
    [*batch, ceil(N/b1), ceil(K/b0)] (fp8): `block` still names the matrix's [K, N] sides."""
    if k_major:
        _check_k_major(dims)
        values, scale = quantize(w, fmt, dims, block, xp)
        return xp.swapaxes(values, -1, -2), xp.swapaxes(scale, -1, -2)
    shape = tuple(w.shape)
    batch, k, n = _split(shape, dims)
    qmax = _QMAX[check_format(fmt)]
    w32 = xp.asarray(w).astype(np.float32)
    # A product by the float32 reciprocal: XLA rewrites division by a constant into it anyway, so
    # writing it out makes host (numpy) and device (XLA) quantization the same bytes.
    inv_qmax = np.float32(1.0 / qmax)
    if fmt == "int8":
        contracted = tuple(range(len(batch), len(batch) + dims[0]))
        amax = xp.max(xp.abs(w32), axis=contracted, keepdims=True)
        scale = xp.where(amax > 0, amax * inv_qmax, 1.0).astype(np.float32)
        return xp.clip(xp.rint(w32 / scale), -qmax, qmax).astype(np.int8), scale
    b0, b1 = block
    kb, nb = -(-k // b0), -(-n // b1)
    m = w32.reshape(batch + (k, n))
    pad = [(0, 0)] * len(batch) + [(0, kb * b0 - k), (0, nb * b1 - n)]
    blocks = xp.pad(xp.abs(m), pad).reshape(batch + (kb, b0, nb, b1))
    amax = xp.max(blocks, axis=(-3, -1))
    scale = xp.where(amax > 0, amax * inv_qmax, 1.0).astype(np.float32)
    values = xp.clip(m / _expand(scale, k, n, block, xp), -qmax, qmax).astype(STORAGE_DTYPES["fp8"])
    return values.reshape(shape), scale


def dequantize(
    values, scale, fmt: str, dims: MatrixDims, block: tuple[int, int], dtype, xp: ModuleType = jnp, *, k_major=False
):
    """values * scale in float32 (each scale over its group), then `dtype`: the float kernel, in the
    float layout [*batch, K, N] also for K-major values (the inverse of `quantize`)."""
    if k_major:
        _check_k_major(dims)
        t = lambda a: xp.swapaxes(a, -1, -2)  # noqa: E731
        return dequantize(t(values), t(scale), fmt, dims, block, dtype, xp)
    if check_format(fmt) == "int8":
        return (values.astype(np.float32) * scale.astype(np.float32)).astype(dtype)
    shape = tuple(values.shape)
    batch, k, n = _split(shape, dims)
    m = values.reshape(batch + (k, n)).astype(np.float32) * _expand(scale.astype(np.float32), k, n, block, xp)
    return m.reshape(shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized kernel as the functional cores take it (a pytree: `values` and `scale` are its
    leaves, the format and layout static).

    k_major: the values are stored [*batch, N, K] (the matrix view transposed; `quantize`), the layout
    in which the GPU's tensor cores read 1-byte weights contiguously along K (ldmatrix cannot transpose
    8-bit elements; docs/quantization.md). The stacked experts are stored so."""

    values: Array  # int8 or float8_e4m3fn, the float kernel's shape (K-major: its last two swapped)
    scale: Float[Array, "..."]  # float32, `scale_shape(format, values.shape, dims, block, k_major=k_major)`
    format: str
    dims: MatrixDims
    block: tuple[int, int] = DEFAULT_BLOCK  # [K, N] sides of the matrix view, however it is stored
    activations: str = "none"  # "fp8": products quantize their input in 1 x block[0] tiles (Quantization)
    k_major: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def stored_block(self) -> tuple[int, int]:
        """The block over the values as stored ([N, K] sides when K-major), as the kernels take it."""
        return (self.block[1], self.block[0]) if self.k_major else self.block

    def dequantize(self, dtype) -> Array:
        """The float kernel, in the float layout ([..., K, N], however the values are stored)."""
        # Frozen: quantized weights take no gradient (their scales would need a quantization-aware rule).
        values, scale = jax.lax.stop_gradient(self.values), jax.lax.stop_gradient(self.scale)
        return dequantize(values, scale, self.format, self.dims, self.block, dtype, k_major=self.k_major)

    def scales_outputs_only(self, contracted_axes: tuple[int, ...]) -> bool:
        """Whether the scale is constant along `contracted_axes` of the kernel, so that it can scale
        the matmul's output instead of the weight (per-channel int8, contracted as laid out)."""
        return self.format == "int8" and all(self.scale.shape[a] == 1 for a in contracted_axes)


jax.tree_util.register_dataclass(
    QuantizedWeight,
    data_fields=["values", "scale"],
    meta_fields=["format", "dims", "block", "activations", "k_major"],
)


def weight_of(kernel, scale) -> QuantizedWeight:
    """The QuantizedWeight of a quantized `Linear`'s kernel and kernel_scale Variables (their metadata
    says the format and layout), e.g. to dequantize it outside the module."""
    meta = kernel.get_metadata()
    q: Quantization = meta["quantization"]
    return as_weight(
        kernel.get_value(), scale.get_value(), q, tuple(meta["matrix_dims"]), k_major=meta.get("k_major", False)
    )


def as_weight(
    kernel: Any, scale: Any, quantization: Quantization | None, dims: MatrixDims, *, k_major: bool = False
) -> Any:
    """The kernel as the cores take it: the array itself, or a QuantizedWeight with its scale."""
    if quantization is None:
        return kernel
    q = quantization
    return QuantizedWeight(kernel, scale, q.format, dims, q.block, q.activations, k_major)
