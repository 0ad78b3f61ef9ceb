"""Rotary position embeddings: default, linear and YaRN frequency schedules; rotate-half and
interleaved-pair layouts (the two conventions found in released checkpoints)."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int


@functools.cache
def inverse_frequencies(
    rotary_dim: int,
    theta: float,
    scaling_type: str = "none",
    scaling_factor: float = 1.0,
    *,
    original_max_len: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """Per-pair inverse frequencies [rotary_dim // 2] (float32, computed on the host once)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling_type in ("none", "default"):
        pass
    elif scaling_type == "linear":
        inv_freq = inv_freq / scaling_factor
    elif scaling_type == "yarn":
        inv_freq = _yarn_inverse_frequencies(
            inv_freq, rotary_dim, theta, scaling_factor, original_max_len, beta_fast, beta_slow
        )
    else:
        raise ValueError(f"unknown rope scaling type {scaling_type!r}")
    inv_freq = inv_freq.astype(np.float32)
    inv_freq.setflags(write=False)  # shared by every caller through the cache
    return inv_freq


def _yarn_inverse_frequencies(inv_freq, dim, theta, factor, original_max_len, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023): keep high-frequency pairs (many rotations over the original context)
    as they are, interpolate low-frequency ones by `factor`, and ramp linearly in between."""

    def correction_dim(num_rotations):
        return dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1 where the original frequency is kept
    return (inv_freq / factor) * (1.0 - extrapolate) + inv_freq * extrapolate


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction `0.1 * mscale * ln(factor) + 1` (1 when not scaled)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(
    x: Float[Array, "b t h d"],
    positions: Int[Array, "b t"],
    inv_freq: np.ndarray | Array,
    *,
    interleaved: bool = False,
    attention_factor: float = 1.0,
) -> Float[Array, "b t h d"]:
    """Rotate each pair of features of `x` by position * frequency.

    rotate-half (Gemma, Grok, HF Llama-style): pair i is (x[i], x[i + d/2]);
    interleaved (the official DeepSeek-V3 code): pair i is (x[2i], x[2i + 1]).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, t, d/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RotaryEmbedding(nnx.Module):
    """The rotary table of one attention flavour. It holds no parameters: its frequencies are a
    host-side constant of the configuration, folded into the compiled program."""

    def __init__(
        self,
        dim: int,
        theta: float,
        scaling_type: str = "none",
        scaling_factor: float = 1.0,
        *,
        interleaved: bool = False,
        attention_factor: float = 1.0,
        original_max_len: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
    ):
        self.dim, self.theta = int(dim), float(theta)
        self.scaling_type, self.scaling_factor = scaling_type, float(scaling_factor)
        self.interleaved, self.attention_factor = interleaved, float(attention_factor)
        self.original_max_len, self.beta_fast, self.beta_slow = (
            int(original_max_len),
            float(beta_fast),
            float(beta_slow),
        )
        inverse_frequencies(*self._key())  # fail at construction on an unknown scaling type

    def _key(self) -> tuple:
        return (self.dim, self.theta, self.scaling_type, self.scaling_factor)

    @property
    def inv_freq(self) -> np.ndarray:
        return inverse_frequencies(
            *self._key(), original_max_len=self.original_max_len, beta_fast=self.beta_fast, beta_slow=self.beta_slow
        )

    def __call__(self, x: Float[Array, "b t h d"], positions: Int[Array, "b t"]) -> Float[Array, "b t h d"]:
        return apply_rope(
            x, positions, self.inv_freq, interleaved=self.interleaved, attention_factor=self.attention_factor
        )
