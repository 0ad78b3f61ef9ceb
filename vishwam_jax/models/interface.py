"""What every family provides, typed: its outputs, its caches and its declared capabilities.

A family is an `nnx.Module` class implementing `CausalLM`. Optional abilities are declared by its
`capabilities` (a class attribute, or a property where the config decides, e.g. a DeepSeek-V3
without MTP layers) and come with a second protocol (`MultiTokenPredictor` for DeepSeek's
MTP module, `PagedCacheLM` for caches that live in a page pool), so callers ask
`model.capabilities.mtp`, never `hasattr`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

# A family's cache: an explicit pytree that goes into a forward and comes out updated. Every cache
# has "pos" [b] (each row's next position); the rest (stacked per-layer arrays) is the family's own.
Cache = dict[str, Any]


@struct.dataclass
class ForwardOutput:
    """One forward over a chunk of tokens.

    logits         float32 [b, k, vocab] at the requested positions
    cache          the cache advanced by the chunk (None for a cache-less forward)
    hidden         the final normed hidden state [b, t, d] at every position (the input of `unembed`;
                   DeepSeek's MTP input)
    expert_counts  tokens routed to each expert [num_moe_layers, num_experts] (MoE families)
    """

    logits: Float[Array, "b k v"]
    cache: Cache | None = None
    hidden: Float[Array, "b t d"] | None = None
    expert_counts: Int[Array, "l e"] | None = None


@dataclasses.dataclass(frozen=True)
class Capabilities:
    mtp: bool = False  # `MultiTokenPredictor`: DeepSeek-V3's multi-token-prediction module
    paged_cache: bool = False  # `PagedCacheLM`: the cache can live in a pool of 64-token pages
    moe: bool = False  # reports expert_counts (and has routers with balancing biases)


class CausalLM(Protocol):
    """A decoder-only language model; one forward serves prefill and decode."""

    config: Any
    capabilities: Capabilities

    def __call__(
        self,
        tokens: Int[Array, "b t"],
        *,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput:
        """Logits for a chunk that continues each row's cache (starting at cache["pos"]).

        lengths: how many of the chunk's tokens belong to each row (the rest is right padding,
          neither attended to nor cached); logit_positions: chunk indices at which to compute logits
          (zero of them: none, e.g. a loss that unembeds `hidden` a piece at a time).
        """
        ...

    def unembed(self, hidden: Float[Array, "b k d"]) -> Float[Array, "b k v"]:
        """The output head: float32 logits of final normed hidden states."""
        ...

    def init_cache(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache: ...


class MultiTokenPredictor(CausalLM, Protocol):
    def mtp(
        self,
        hidden: Float[Array, "b t d"],
        next_tokens: Int[Array, "b t"],
        *,
        depth: int = 0,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput: ...

    def init_mtp_cache(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache: ...


class PagedCacheLM(CausalLM, Protocol):
    def init_paged_cache(self, block_table: Int[Array, "b mb"], num_blocks: int, dtype=jnp.bfloat16) -> Cache:
        """An empty cache whose per-token state lives in pools of `num_blocks` 64-token pages
        (inference/paged_cache.py), read through `block_table` (one row per sequence); state that
        does not grow with the sequence (e.g. sliding-window rings) may stay per row."""
        ...


def chunk_positions(cache: Cache | None, batch: int, length: int) -> Int[Array, "b t"]:
    """Absolute positions of a chunk of `length` tokens: it starts where each row's cache ends."""
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["pos"]
    return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def chunk_lengths(lengths: Int[Array, " b"] | None, batch: int, length: int) -> Int[Array, " b"]:
    return jnp.full((batch,), length, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
