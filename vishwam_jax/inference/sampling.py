"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (hashable: they are compiled into the decode loop)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def truncate(scaled: Float[Array, "b v"], top_k: Int[Array, " b"], top_p: Float[Array, " b"]) -> Float[Array, "b v"]:
    """Temperature-scaled logits with everything outside each row's top-k (0: off) and then outside
    the smallest prefix whose mass reaches its top_p (1: off; the first token is always kept) set to
    -inf."""
    vocab = scaled.shape[-1]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_index = jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.maximum(jnp.take_along_axis(ranked, cutoff_index, axis=-1), kth)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


# top-k below this is found by lax.top_k instead of a sort of the whole vocabulary (every row's top_k
# at most this and no top_p): the same threshold, at a tenth of the cost on a CPU for a 256k
# vocabulary. On GPUs XLA's selection kernel covers k <= 16 and sorts above that (not measured).
TOP_K_SELECT_MAX = 256


def truncate_top_k(scaled: Float[Array, "b v"], top_k: Int[Array, " b"], most: int) -> Float[Array, "b v"]:
    """`truncate` for rows with 0 < top_k <= most and top_p off (0: no truncation), by selecting the
    `most` largest values instead of sorting them all."""
    largest, _ = jax.lax.top_k(scaled, min(most, scaled.shape[-1]))
    kth = jnp.take_along_axis(largest, (jnp.clip(top_k, 1, largest.shape[-1]) - 1)[:, None], axis=-1)
    return jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)


def sample(logits: Float[Array, "b v"], key: jax.Array, params: SamplingParams) -> Int[Array, " b"]:
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k is not None or params.top_p is not None:
        b = logits.shape[0]
        logits = truncate(
            logits, jnp.full((b,), params.top_k or 0, jnp.int32), jnp.full((b,), params.top_p or 1.0, jnp.float32)
        )
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# What a batch of rows needs, from the cheapest: argmax only; a draw from the scaled logits; a top-k
# selection first; a sort of the vocabulary (top-p, or a top-k above TOP_K_SELECT_MAX).
SAMPLING_MODES = ("greedy", "temperature", "top_k", "nucleus")


def sampling_mode(temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> str:
    """The mode a batch of rows needs (host arrays): what `sample_rows` decides on the device when
    it is not told."""
    if not np.any(temperature > 0):
        return "greedy"
    if np.any(top_p < 1.0) or np.any(top_k > TOP_K_SELECT_MAX):
        return "nucleus"
    return "top_k" if np.any(top_k > 0) else "temperature"


def sample_rows(
    logits: Float[Array, "b v"],
    seeds: Int[Array, " b"],
    counters: Int[Array, " b"],
    temperature: Float[Array, " b"],
    top_k: Int[Array, " b"],
    top_p: Float[Array, " b"],
    mode: str | None = None,
) -> Int[Array, " b"]:
    """`sample` with settings per row (a serving batch mixes requests): temperature 0 is greedy,
    top_k 0 and top_p 1 are off. Row b draws from key(seeds[b]) folded with counters[b] (its token
    index), so a request's samples do not depend on which other requests share the batch.

    mode (static, one of SAMPLING_MODES): the work the batch needs, as `sampling_mode` tells it from
    the same settings on the host. Without it the device decides with `lax.cond`s, and on a GPU a
    conditional waits for its predicate on the host: a decode step that samples that way blocks its
    caller until the whole step has run, so the host can never dispatch ahead of the device.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(truncation: str) -> Int[Array, " b"]:
        scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        if truncation == "nucleus":
            scaled = truncate(scaled, top_k, top_p)
        elif truncation == "top_k":
            scaled = truncate_top_k(scaled, top_k, TOP_K_SELECT_MAX)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counters)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    if mode is not None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
        return greedy if mode == "greedy" else draw(mode)

    def stochastic() -> Int[Array, " b"]:
        # Only what the rows ask for: temperature alone needs no truncation, top-k alone a selection;
        # a top_p (or a large top_k) sorts the vocabulary.
        nucleus = jnp.any(top_p < 1.0) | jnp.any(top_k > TOP_K_SELECT_MAX)
        return jax.lax.cond(
            nucleus,
            lambda: draw("nucleus"),
            lambda: jax.lax.cond(jnp.any(top_k > 0), lambda: draw("top_k"), lambda: draw("temperature")),
        )

    # An all-greedy batch (the common serving case) skips the vocabulary sort.
    return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: greedy)
