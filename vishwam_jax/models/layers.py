"""Building blocks shared by every family: parameters with logical axes, RMSNorm, embeddings,
linear maps (optionally weight-only int8), the gated MLP, soft-capping.

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


def param(value: Array, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` whose every dimension names its logical axis (None: never sharded).

    Placement happens later, by the rules of sharding/ (at `jit(..., out_shardings=...)` or at
    restore), so the parameter is created unsharded (`eager_sharding=False`).
    """
    if axes is None or isinstance(axes, str) or len(tuple(axes)) != jnp.ndim(value):
        raise MissingAxesError(
            f"a parameter of shape {tuple(jnp.shape(value))} needs one logical axis per dimension; got {axes!r}"
        )
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


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


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict) and "int8" in w


def dequantize(w: Any, dtype) -> Array:
    """A weight that may be stored int8 with broadcastable scales, as the dense `dtype` array."""
    if is_quantized(w):
        return (w["int8"].astype(jnp.float32) * w["scale"].astype(jnp.float32)).astype(dtype)
    return w.astype(dtype)


def linear(x: Array, w: Any, spec: str) -> Array:
    """`einsum(spec, x, w)` where `w` may be weight-only int8 ({"int8", "scale"}).

    int8 weights are converted to the activation dtype inside the einsum's fusion and the scale is
    applied to the (much smaller) output, so no dequantized copy of the weight is kept around.
    """
    if is_quantized(w):
        out = jnp.einsum(spec, x, w["int8"].astype(x.dtype), preferred_element_type=jnp.float32)
        scale = w["scale"].astype(jnp.float32)
        # Scales are stored broadcastable against the weight with the contracted axes of size 1;
        # drop those axes so they broadcast against the output's trailing axes.
        out_axes = spec.split("->")[1]
        w_axes = spec.split("->")[0].split(",")[1]
        keep = [i for i, a in enumerate(w_axes) if a in out_axes]
        scale = scale.reshape([scale.shape[i] for i in keep])
        return (out * scale).astype(x.dtype)
    return jnp.einsum(spec, x, w.astype(x.dtype) if w.dtype != x.dtype else w)


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
    both per head and absorbed). `int8_scale_shape` stores the weight as weight-only int8 with float32
    scales of that (broadcastable) shape, as converted checkpoints keep them.
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
        int8_scale_shape: tuple[int, ...] | None = None,
    ):
        self.spec = spec
        self.quantized = int8_scale_shape is not None
        if self.quantized:
            self.kernel = param(jnp.zeros(shape, jnp.int8), axes)
            self.scale = param(jnp.ones(int8_scale_shape, jnp.float32), axes)
        else:
            self.kernel = param(truncated_normal(rngs.params(), shape, fan_in, dtype), axes)

    @property
    def weight(self) -> Any:
        """The weight as the functional cores take it: an array, or {"int8", "scale"}."""
        if self.quantized:
            return {"int8": self.kernel[...], "scale": self.scale[...]}
        return self.kernel[...]

    def __call__(self, x: Array, spec: str | None = None) -> Array:
        return linear(x, self.weight, spec or self.spec)


def int8_scale_shape(shape: tuple[int, ...], contracted: Sequence[int], enabled: bool) -> tuple[int, ...] | None:
    """Per-output-channel scales: size 1 on the contracted dimensions (None when not quantized)."""
    if not enabled:
        return None
    return tuple(1 if i in contracted else n for i, n in enumerate(shape))


class GatedMLP(nnx.Module):
    """`down(act(x W_gate) * (x W_up))` with weights [d, f] / [f, d]."""

    def __init__(self, d: int, f: int, activation: str, *, rngs: nnx.Rngs, dtype=jnp.float32, int8: bool = False):
        self.activation = activation
        self.gate = Linear(
            (d, f),
            ("embed", "mlp"),
            "...d,df->...f",
            rngs=rngs,
            fan_in=d,
            dtype=dtype,
            int8_scale_shape=int8_scale_shape((d, f), (0,), int8),
        )
        self.up = Linear(
            (d, f),
            ("embed", "mlp"),
            "...d,df->...f",
            rngs=rngs,
            fan_in=d,
            dtype=dtype,
            int8_scale_shape=int8_scale_shape((d, f), (0,), int8),
        )
        self.down = Linear(
            (f, d),
            ("mlp", "embed"),
            "...f,fd->...d",
            rngs=rngs,
            fan_in=f,
            dtype=dtype,
            int8_scale_shape=int8_scale_shape((f, d), (0,), int8),
        )

    def weights(self) -> dict:
        return {"gate": self.gate.weight, "up": self.up.weight, "down": self.down.weight}

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return gated_mlp(x, self.weights(), self.activation)
