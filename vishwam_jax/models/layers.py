"""Building blocks shared by every family: RMSNorm, embeddings, gated MLPs, soft-capping, int8 matmul."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vishwam_jax.sharding.context import constrain

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, "d"], eps: float, *, plus_one: bool = False) -> Float[Array, "... d"]:
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


def embed(tokens: Int[Array, "b t"], table: Float[Array, "v d"], scale: float | None = None) -> Float[Array, "b t d"]:
    x = jnp.take(table, tokens, axis=0)
    if scale is not None:
        # Rounded to the table dtype first, as the reference implementations do in bf16.
        x = x * jnp.asarray(scale, dtype=table.dtype)
    # The residual stream starts here: split by batch, whole along d (however the table is split).
    return constrain(x, ("batch", "length", "embed")) if x.ndim == 3 else x


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict) and "int8" in w


def dequantize(w: Any, dtype) -> Array:
    """A weight that may be stored int8 with broadcastable scales, as the dense `dtype` array."""
    if is_quantized(w):
        return (w["int8"].astype(jnp.float32) * w["scale"].astype(jnp.float32)).astype(dtype)
    return w.astype(dtype)


def linear(x: Array, w: Any, spec: str) -> Array:
    """`einsum(spec, x, w)` where `w` may be weight-only int8 with per-output-channel scales.

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


def gated_mlp(x: Float[Array, "... d"], params: dict, activation: str) -> Float[Array, "... d"]:
    """`down(act(x @ gate) * (x @ up))`: GeGLU for Gemma/Grok, SwiGLU for DeepSeek."""
    act = ACTIVATIONS[activation]
    gate = linear(x, params["gate"], "...d,df->...f")
    up = linear(x, params["up"], "...d,df->...f")
    h = act(gate) * up
    if x.ndim != 3:  # flattened tokens (e.g. a shared expert): leave placement to the caller
        return linear(h, params["down"], "...f,fd->...d")
    # Megatron split: the hidden width over tensor, so the down projection ends in one reduction.
    h = constrain(h, ("batch", "length", "mlp"))
    return constrain(linear(h, params["down"], "...f,fd->...d"), ("batch", "length", "embed"))


def init_dense(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> Array:
    """Truncated-normal init with std 1/sqrt(fan_in): keeps activations O(1) for random-weight runs."""
    std = 1.0 / math.sqrt(fan_in)
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)
