"""Building blocks shared by every family: parameters with logical axes, RMSNorm, embeddings,
linear maps (optionally with quantized weights, vishwam_jax/quantization), the gated MLP, soft-capping.

Each idea has one functional core (`rms_norm`, `linear`, `gated_mlp`, ...) that the modules call, so
a kernel-level caller (the expert dispatch, MLA's absorbed form) and a module compute the same thing.
Every parameter is created through `param`, which requires one logical axis name (or None) per
dimension: sharding/ maps those names to mesh axes and never guesses from names or sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.quantization import MatrixDims, Quantization, QuantizedWeight, quantize, scale_axes, scale_shape
from vishwam_jax.quantization.formats import as_weight
from vishwam_jax.quantization.fp8_training import fp8_active, fp8_matmul
from vishwam_jax.sharding.context import constrain

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}

LogicalAxes = tuple[str | None, ...]


# -- parameters ------------------------------------------------------------------------------------
class MissingAxesError(ValueError):
    """A parameter was created without one logical axis name per dimension."""


def param(value: Array, axes: Sequence[str | None], **metadata: Any) -> nnx.Param:
    """An `nnx.Param` whose every dimension names its logical axis (None: never sharded).

    Placement happens later, by the rules of sharding/ (at `jit(..., out_shardings=...)` or at
    restore), so the parameter is created unsharded (`eager_sharding=False`). `metadata` rides along
    on the Variable (a kernel's `matrix_dims`, which quantizing it at load needs).
    """
    if axes is None or isinstance(axes, str) or len(tuple(axes)) != jnp.ndim(value):
        raise MissingAxesError(
            f"a parameter of shape {tuple(jnp.shape(value))} needs one logical axis per dimension; got {axes!r}"
        )
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, **metadata)


def truncated_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
    """std 1/sqrt(fan_in): keeps activations O(1) for random-weight runs."""
    std = 1.0 / math.sqrt(fan_in)
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)


def logical_axes_of(variable: nnx.Variable) -> LogicalAxes | None:
    names = variable.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def check_axes(module: nnx.Module) -> None:
    """Raise MissingAxesError naming every parameter of `module` without logical axes per dimension."""
    missing = []
    for path, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            axes = logical_axes_of(variable)
            shape = tuple(variable.get_value().shape)  # an array, a ShapeDtypeStruct or per-layer buffers
            if axes is None or len(axes) != len(shape):
                missing.append(f"{'.'.join(map(str, path))} {shape}: {axes}")
    if missing:
        raise MissingAxesError("parameters without one logical axis per dimension: " + "; ".join(missing))


# -- functional cores ------------------------------------------------------------------------------
def rms_norm(
    x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float, *, plus_one: bool = False
) -> Float[Array, "... d"]:
    """RMSNorm in float32. Gemma stores its scale as an offset from 1 (`1 + w`); Llama-style
    models (DeepSeek-V3, Grok-1) multiply by `w` itself."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    if plus_one:
        scale = 1.0 + scale
    return (normed * scale).astype(x.dtype)


def soft_cap(x: Array, cap: float) -> Array:
    """`cap * tanh(x / cap)`; a cap of 0 disables it."""
    if not cap:
        return x
    return cap * jnp.tanh(x / cap)


def _contract(spec: str, x: Array, w: Array, preferred_element_type=None, matmul=None) -> Array:
    """`einsum(spec, x, w)`, as one 2-D matmul where the spec allows: x's trailing axes contracted
    with w's leading ones, and the output x's other axes then w's others ("btd,dhk->bthk",
    "bthk,hkd->btd"). XLA:GPU strength-reduces a one-token einsum against a 3-D weight into a
    multiply that writes a weight-sized temporary and a reduce over it (3x the weight's bytes; a
    fifth of gemma-2b's batch-1 decode step on an H100); a 2-D dot stays a GEMM that reads the weight
    once. `matmul(rows, w2d)`: what computes the 2-D product instead of jnp.dot (FP8 training)."""
    n_c = _matrix_contraction(spec)
    if n_c is None:
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    prefix = spec.split(",")[0][: x.ndim - n_c]
    k = math.prod(w.shape[:n_c])
    rows = x.reshape(-1, k)
    if matmul is not None:
        return matmul(rows, w.reshape(k, -1)).reshape(x.shape[: len(prefix)] + w.shape[n_c:])
    if rows.shape[0] == 1:
        # A one-row product against a small weight (attention's projections) is still strength-reduced
        # as a vector; a second (zero) row keeps it a GEMM at no cost to a read-bound step.
        y = jnp.dot(jnp.pad(rows, ((0, 1), (0, 0))), w.reshape(k, -1), preferred_element_type=preferred_element_type)[
            :1
        ]
    else:
        y = jnp.dot(rows, w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(x.shape[: len(prefix)] + w.shape[n_c:])


def _matrix_contraction(spec: str) -> int | None:
    """How many of w's leading axes the einsum contracts, if it is one 2-D matmul (see `_contract`)."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    contracted = "".join(a for a in rhs if a not in out)
    n_c, prefix = len(contracted), lhs[: len(lhs) - len(contracted)]
    if (
        "." in spec
        or not contracted
        or not rhs.startswith(contracted)
        or not lhs.endswith(contracted)
        or out != prefix + rhs[n_c:]
        or set(prefix) & set(rhs)
    ):
        return None
    return n_c


def quantized_gmm(
    x: Float[Array, "m k"], values: Array, scale: Array, group_sizes: Int[Array, " g"], w: QuantizedWeight
) -> Float[Array, "m n"]:
    """Rows of `x` sorted by group times each group's quantized matrix (`values` [g, k, n], or [g, n, k]
    when `w` is K-major, and `scale` as stored, in `w`'s format), by the grouped-matmul kernels, which
    read the narrow values as they are. With fp8 activations `x` is quantized first, in 1 x block[0]
    tiles along K, and both operands go to `gmm_fp8`."""
    from vishwam_jax.pallas_kernels import grouped_matmul  # local: kernels import nothing from models

    layout = dict(transpose_rhs=w.k_major, preferred_element_type=x.dtype)
    if w.activations == "fp8":
        x8, x_scale = quantize(x, "fp8", (1, 1), (1, w.block[0]))
        return grouped_matmul.gmm_fp8(x8, x_scale, values, scale, group_sizes, rhs_scale_block=w.stored_block, **layout)
    block = w.stored_block if w.format == "fp8" else None
    return grouped_matmul.gmm(x, values, group_sizes, rhs_scale=scale, rhs_scale_block=block, **layout)


def _without_ellipsis(spec: str, ndim: int) -> str:
    """`spec` with "..." spelled out as letters for x's leading axes ("...d,df->...f" -> "Ad,df->Af")."""
    if "..." not in spec:
        return spec
    lhs = spec.split(",")[0]
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec]
    return spec.replace("...", "".join(free[: ndim - (len(lhs) - 3)]))


def _kernel_takes(spec: str, w: QuantizedWeight) -> bool:
    """Whether the grouped-matmul kernel runs this fp8 product as one group, reading the float8 bytes
    as stored: an einsum (ellipsis spelled out) that is one 2-D matmul over exactly the weight's
    contracted dimensions, a weight without batch dimensions, and a backend with a block-scaled kernel
    (any backend with fp8 activations, so that their numerics do not depend on it). int8 stays with
    XLA's fused int8 dot, which measured as fast or faster than the kernel on one-group products
    (BENCHMARKS.md, "Dense projections with quantized weights")."""
    from vishwam_jax.pallas_kernels import grouped_matmul

    if w.format != "fp8" or len(w.shape) != sum(w.dims) or _matrix_contraction(spec) != w.dims[0]:
        return False
    return w.activations == "fp8" or grouped_matmul.has_block_scaled_kernel(w.block)


def _kernel_linear(x: Array, w: QuantizedWeight) -> Array:
    """`linear` through `quantized_gmm` with one group (`_kernel_takes` said it may): x's contracted
    trailing axes flattened into K, the weight's [K, N] (or K-major [N, K]) matrix as stored."""
    n_c = w.dims[0]
    k = math.prod(x.shape[x.ndim - n_c :])
    rows = x.reshape(-1, k)
    values, scale = jax.lax.stop_gradient(w.values), jax.lax.stop_gradient(w.scale)
    matrix = values.reshape(-1, k) if w.k_major else values.reshape(k, -1)
    one_group = jnp.full((1,), rows.shape[0], jnp.int32)
    y = quantized_gmm(rows, matrix[None], scale[None], one_group, w)
    out_shape = (values.shape[0],) if w.k_major else values.shape[n_c:]
    return y.reshape(x.shape[: x.ndim - n_c] + tuple(out_shape))


def linear(x: Array, w: Array | QuantizedWeight, spec: str) -> Array:
    """`einsum(spec, x, w)`; a quantized `w` computes exactly what its dequantized weight would.

    Quantized, the grouped-matmul kernel takes fp8 products where it reads the stored bytes
    (`_kernel_takes`). Otherwise a per-output-channel int8 scale, constant along the contracted
    axes, scales the (much smaller) float32 output of a product with the int8 values converted in the
    matmul's operand; any other weight is dequantized into the einsum's operand, which XLA fuses into
    the matmul (no dequantized copy is kept).
    """
    if not isinstance(w, QuantizedWeight):
        w = w.astype(x.dtype) if w.dtype != x.dtype else w
        if fp8_active():  # FP8 training GEMMs, where the einsum is one matmul (the projections)
            return _contract(_without_ellipsis(spec, x.ndim), x, w, matmul=fp8_matmul)
        return _contract(spec, x, w)
    explicit = _without_ellipsis(spec, x.ndim)
    if _kernel_takes(explicit, w):
        return _kernel_linear(x, w)
    inputs, out_axes = spec.split("->")
    w_axes = inputs.split(",")[1]
    contracted = tuple(i for i, a in enumerate(w_axes) if a not in out_axes)
    if w.k_major and w.format == "int8" and len(w.shape) == 2 and _matrix_contraction(explicit) == 1:
        # [N, K] values contracted along their last axis: XLA reads the transposed operand in place.
        values = jax.lax.stop_gradient(w.values).astype(x.dtype)
        out = jnp.einsum("...k,nk->...n", x, values, preferred_element_type=jnp.float32)
        return (out * jax.lax.stop_gradient(w.scale).reshape(-1)).astype(x.dtype)
    if w.k_major or not w.scales_outputs_only(contracted):
        return linear(x, w.dequantize(x.dtype), spec)
    out = _contract(spec, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
    # The scale is broadcastable against the weight with the contracted axes of size 1; drop those
    # axes so that it broadcasts against the output's trailing axes.
    scale = jax.lax.stop_gradient(w.scale).astype(jnp.float32)
    scale = scale.reshape([scale.shape[i] for i, a in enumerate(w_axes) if a in out_axes])
    return (out * scale).astype(x.dtype)


def gated_mlp(x: Float[Array, "... d"], weights: dict, activation: str) -> Float[Array, "... d"]:
    """`down(act(x @ gate) * (x @ up))`: GeGLU for Gemma/Grok, SwiGLU for DeepSeek."""
    act = ACTIVATIONS[activation]
    gate = linear(x, weights["gate"], "...d,df->...f")
    up = linear(x, weights["up"], "...d,df->...f")
    h = act(gate) * up
    if x.ndim != 3:  # flattened tokens (e.g. a shared expert): leave placement to the caller
        return linear(h, weights["down"], "...f,fd->...d")
    # Megatron split: the hidden width over tensor, so the down projection ends in one reduction.
    h = constrain(h, ("batch", "length", "mlp"))
    return constrain(linear(h, weights["down"], "...f,fd->...d"), ("batch", "length", "embed"))


# -- modules ---------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """RMSNorm over the last axis; `plus_one` for Gemma's `1 + w` scale (initialised at 0)."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool = False, dtype=jnp.float32):
        self.eps = eps
        self.plus_one = plus_one
        # Identity at initialisation either way: 1 + 0 or 1.
        self.scale = param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype), ("norm",))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return rms_norm(x, self.scale[...], self.eps, plus_one=self.plus_one)


class Embed(nnx.Module):
    """Token embedding table [vocab, d]; also the tied output projection of Gemma and Grok-1."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, init_std_fan_in: int | None = None):
        self.embedding = param(
            truncated_normal(rngs.params(), (vocab, dim), init_std_fan_in or dim, dtype), ("vocab", "embed")
        )

    def __call__(self, tokens: Int[Array, "b t"], scale: float | None = None) -> Float[Array, "b t d"]:
        table = self.embedding[...]
        x = jnp.take(table, tokens, axis=0)
        if scale is not None:
            # Rounded to the table dtype first, as the reference implementations do in bf16.
            x = x * jnp.asarray(scale, dtype=table.dtype)
        # The residual stream starts here: split by batch, whole along d (however the table is split).
        return constrain(x, ("batch", "length", "embed")) if x.ndim == 3 else x

    def attend(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """Tied output logits `h @ E.T` in float32."""
        return jnp.einsum("btd,vd->btv", h, self.embedding[...].astype(h.dtype), preferred_element_type=jnp.float32)


class Linear(nnx.Module):
    """A weight of any rank applied by an einsum (heads keep their own axis: q is [d, h, hd]).

    `spec` is the default einsum from input to output; a caller may pass another (MLA applies W_k_b
    both per head and absorbed). The kernel is laid out [*batch, *contracted, *outputs]; `dims` =
    (contracted, outputs) counts the trailing dimensions that form its matrix, which is what a
    quantization's scales are defined over. With `quantization` the kernel holds the quantized
    values and `kernel_scale` their float32 scales (vishwam_jax/quantization). A quantized matrix of
    one contracted and one output dimension (the MLPs, the experts, MLA's down projections) is stored
    K-major, [*batch, N, K], with its scales alike: the layout in which the grouped matmul streams
    1-byte weights at the read bandwidth (BENCHMARKS.md) and the one DeepSeek's FP8 release ships.
    `shape` and `axes` name the float kernel either way.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        axes: LogicalAxes,
        spec: str,
        *,
        rngs: nnx.Rngs,
        fan_in: int,
        dtype=jnp.float32,
        dims: MatrixDims = (1, 1),
        quantization: Quantization | None = None,
    ):
        self.spec, self.dims, self.quantization = spec, tuple(dims), quantization
        self.k_major = quantization is not None and self.dims == (1, 1)
        if quantization is None:
            self.kernel = param(truncated_normal(rngs.params(), shape, fan_in, dtype), axes, matrix_dims=self.dims)
            self.kernel_scale = None
            return
        fmt, axes = quantization.format, tuple(axes)
        if self.k_major:
            shape, axes = (*shape[:-2], shape[-1], shape[-2]), (*axes[:-2], axes[-1], axes[-2])
        self.kernel = param(
            jnp.zeros(shape, quantization.storage_dtype), axes,
            matrix_dims=self.dims, quantization=quantization, k_major=self.k_major,
        )  # fmt: skip
        self.kernel_scale = param(
            jnp.ones(scale_shape(fmt, shape, self.dims, quantization.block, k_major=self.k_major), jnp.float32),
            scale_axes(fmt, axes, self.dims),
        )

    @property
    def weight(self) -> Array | QuantizedWeight:
        """The weight as the functional cores take it: an array, or a QuantizedWeight."""
        scale = None if self.kernel_scale is None else self.kernel_scale[...]
        return as_weight(self.kernel[...], scale, self.quantization, self.dims, k_major=self.k_major)

    def __call__(self, x: Array, spec: str | None = None) -> Array:
        return linear(x, self.weight, spec or self.spec)


class GatedMLP(nnx.Module):
    """`down(act(x W_gate) * (x W_up))` with weights [d, f] / [f, d]."""

    def __init__(
        self,
        d: int,
        f: int,
        activation: str,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        quantization: Quantization | None = None,
    ):
        self.activation = activation
        up = dict(rngs=rngs, fan_in=d, dtype=dtype, quantization=quantization)
        self.gate = Linear((d, f), ("embed", "mlp"), "...d,df->...f", **up)
        self.up = Linear((d, f), ("embed", "mlp"), "...d,df->...f", **up)
        self.down = Linear(
            (f, d), ("mlp", "embed"), "...f,fd->...d", rngs=rngs, fan_in=f, dtype=dtype, quantization=quantization
        )

    def weights(self) -> dict:
        return {"gate": self.gate.weight, "up": self.up.weight, "down": self.down.weight}

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return gated_mlp(x, self.weights(), self.activation)
