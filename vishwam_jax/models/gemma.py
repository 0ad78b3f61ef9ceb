"""Gemma 1, 2 and 3 (text): one model, configured per generation.

    x = embed(tokens) * sqrt(d)
    for each layer:   x += [post_norm](attention(norm(x)))      # GQA/MQA, RoPE, soft-cap, window, QK-norm
                      x += [post_norm](geglu_mlp(norm(x)))
    logits = soft_cap(norm(x) @ embed.T)                          # tied embeddings

All norms are RMSNorm with Gemma's `1 + w` scale. Gemma 2 and 3 alternate sliding-window (local)
and global layers with a fixed period (every 2nd / 6th layer is global), so the layers are stored and
scanned in periods: `blocks` stacks the num_layers // period full periods (layer i is
blocks.layers[i % period] at index i // period) and `tail` holds the remaining layers unstacked.

Cache (models/attention.py): per layer k, v and slot_pos, stacked like the layers ("blocks": one per
position of a period, [num_periods, ...]; "tail": one per remaining layer); global layers hold a row of
max_len slots per sequence, sliding-window layers a ring of `sliding_window` slots. Paged
(`init_paged_cache`): the global layers' K/V live in page pools [num_periods, num_blocks, page, ...]
read through one "block_table" [b, max_blocks]; the sliding-window layers keep their per-row rings
(already bounded by the window, so paging them would save nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.models import stack
from vishwam_jax.models.attention import Attention, init_kv_cache_layer, init_paged_kv_layer
from vishwam_jax.models.interface import Cache, Capabilities, ForwardOutput, chunk_lengths, chunk_positions
from vishwam_jax.models.layers import Embed, GatedMLP, RMSNorm, soft_cap
from vishwam_jax.models.remat import policy_of
from vishwam_jax.models.rope import RotaryEmbedding
from vishwam_jax.presets.gemma import attention_period
from vishwam_jax.quantization import Quantization


def kept_in_pages(kind: str) -> bool:
    """Whether a layer of this kind keeps its K/V in page pools in a paged cache: global layers do;
    sliding-window layers keep their rings."""
    return kind == "full"


class DecoderLayer(nnx.Module):
    """x += [post_norm](attention(norm(x))); x += [post_norm](geglu_mlp(norm(x)))."""

    def __init__(self, config, *, sliding: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        d, eps = config.d_model, config.norm_eps
        norm = lambda: RMSNorm(d, eps=eps, plus_one=True, dtype=dtype)  # noqa: E731
        quantization = Quantization.of(config)
        if sliding:
            rope = RotaryEmbedding(config.head_dim, config.rope_local_theta)
        else:
            rope = RotaryEmbedding(
                config.head_dim, config.rope_theta, config.rope_scaling_type, config.rope_scaling_factor
            )
        self.attn_norm = norm()
        self.attn = Attention(
            d, config.num_heads, config.num_kv_heads, config.head_dim,
            rope=rope,
            scale=config.query_pre_attn_scalar**-0.5,
            softcap=config.attn_logit_softcap,
            window=config.sliding_window if sliding else 0,
            qk_norm_eps=eps if config.use_qk_norm else None,
            prefix_keys=True,  # Gemma masks no key inside a row (key_valid is all ones)
            rngs=rngs, dtype=dtype, quantization=quantization,
        )  # fmt: skip
        self.post_attn_norm = norm() if config.use_post_attn_norm else None
        self.mlp_norm = norm()
        self.mlp = GatedMLP(d, config.ffn_dim, config.activation, rngs=rngs, dtype=dtype, quantization=quantization)
        self.post_mlp_norm = norm() if config.use_post_ffw_norm else None

    def __call__(self, x: Float[Array, "b t d"], positions, lengths, key_valid, cache: dict | None):
        h, cache = self.attn(self.attn_norm(x), positions, lengths, key_valid, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, cache


class Period(nnx.Module):
    """Consecutive layers of one local/global period, run in order."""

    def __init__(self, config, kinds: tuple[str, ...], *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layers = nnx.List([DecoderLayer(config, sliding=k == "sliding", rngs=rngs, dtype=dtype) for k in kinds])

    def __call__(self, x, positions, lengths, key_valid, caches: list | None):
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, lengths, key_valid, None if caches is None else caches[i])
            new_caches.append(cache)
        return x, (None if caches is None else new_caches)


class Gemma(nnx.Module):
    capabilities = Capabilities(paged_cache=True)

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        period = attention_period(config)
        num_periods, remainder = divmod(config.num_layers, period)
        kinds = config.layer_types
        # Scaled so that embed * sqrt(d) has unit-variance entries.
        self.embed = Embed(config.vocab_size, config.d_model, rngs=rngs, dtype=dtype)
        self.blocks = (
            stack.stacked(num_periods, lambda r: Period(config, kinds[:period], rngs=r, dtype=dtype), rngs)
            if num_periods
            else None
        )
        self.tail = Period(config, kinds[num_periods * period :], rngs=rngs, dtype=dtype) if remainder else None
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, plus_one=True, dtype=dtype)

    # -- caches ------------------------------------------------------------------------------------
    def _layer_caches(self, period_cache: Callable[[str], dict], tail_cache: Callable[[str], dict]) -> Cache:
        """The caches of "blocks" (one per position of a period, stacked [num_periods, ...] like the
        layers) and "tail" (one per remaining layer), from one layer's cache per kind of layer."""
        c = self.config
        period = attention_period(c)
        num_periods = c.num_layers // period
        stacked = lambda one: {k: jnp.broadcast_to(v, (num_periods, *v.shape)) for k, v in one.items()}  # noqa: E731
        caches: Cache = {}
        if num_periods:
            caches["blocks"] = [stacked(period_cache(kind)) for kind in c.layer_types[:period]]
        if c.num_layers % period:
            caches["tail"] = [tail_cache(kind) for kind in c.layer_types[num_periods * period :]]
        return caches

    def _rows(self, batch: int, max_len: int, dtype) -> Callable[[str], dict]:
        """One layer's cache rows: max_len slots for a global layer, a ring of the window (at most
        max_len) for a sliding one."""
        c = self.config

        def layer_cache(kind: str) -> dict:
            slots = min(c.sliding_window, max_len) if kind == "sliding" else max_len
            return init_kv_cache_layer(batch, slots, c.num_kv_heads, c.head_dim, dtype)

        return layer_cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
        """Full-length slots for global layers, a ring of `sliding_window` slots for local ones;
        stacked like the layers (blocks: one stacked cache per position in the period)."""
        rows = self._rows(batch, max_len, dtype)
        return {"pos": jnp.zeros((batch,), jnp.int32), **self._layer_caches(rows, rows)}

    def init_paged_cache(self, block_table: Int[Array, "b mb"], num_blocks: int, dtype=jnp.float32) -> Cache:
        """The global layers' K/V in page pools (inference/paged_cache.py) [num_periods, num_blocks,
        page, kv_heads, head_dim], read through one block table for every layer; sliding-window
        layers keep per-row rings. The tail (the layers after the last whole period) is all
        sliding-window, since each period ends with its global layer: it keeps rings too."""
        c = self.config
        table = jnp.asarray(block_table, jnp.int32)
        batch, capacity = table.shape[0], table.shape[1] * paged_cache.PAGE
        rows = self._rows(batch, capacity, dtype)

        def period_cache(kind: str) -> dict:
            return (
                init_paged_kv_layer(num_blocks, c.num_kv_heads, c.head_dim, dtype)
                if kept_in_pages(kind)
                else rows(kind)
            )

        caches = self._layer_caches(period_cache, rows)
        return {"pos": jnp.zeros((batch,), jnp.int32), "block_table": table, **caches}

    def __call__(
        self,
        tokens: Int[Array, "b t"],
        *,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput:
        batch, t = tokens.shape
        lengths = chunk_lengths(lengths, batch, t)
        positions = chunk_positions(cache, batch, t)
        key_valid: Bool[Array, "b t"] = jnp.ones((batch, t), bool)
        policy = policy_of(self.config)

        def body(period: Period, x, caches):
            x, caches = period(x, positions, lengths, key_valid, caches)
            return x, caches, None

        x = self.embed(tokens, math.sqrt(self.config.d_model))
        new_cache: Cache = {}
        if self.blocks is not None:
            period = attention_period(self.config)
            x, new_cache["blocks"], _ = stack.scan_paged(
                self.blocks, x, None if cache is None else cache["blocks"], body,
                block_table=None if cache is None else cache.get("block_table"),
                paged=[kept_in_pages(kind) for kind in self.config.layer_types[:period]],
                remat_policy=policy, unroll=self.config.scan_unroll,
            )  # fmt: skip
        if self.tail is not None:
            x, new_cache["tail"], _ = stack.run(
                self.tail, x, None if cache is None else cache["tail"], body, remat_policy=policy
            )

        h = self.final_norm(x)
        at = h if logit_positions is None else jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
        logits = self.unembed(at)
        if cache is None:
            return ForwardOutput(logits=logits, hidden=h)
        # {**cache, ...}: a paged cache keeps its block table
        return ForwardOutput(logits=logits, cache={**cache, "pos": cache["pos"] + lengths, **new_cache}, hidden=h)

    def unembed(self, hidden: Float[Array, "b k d"]) -> Float[Array, "b k v"]:
        """Tied output: the input embedding table, transposed, then Gemma 2/3's final soft cap."""
        return soft_cap(self.embed.attend(hidden), self.config.final_logit_softcap)
