"""Grok-1 (xAI's open release), step by step as shared/docs/grok1.md states it.

    key_valid = tokens != pad                                  # padding is masked as keys
    h = E[tokens] * embedding_multiplier_scale
    for each layer (every one MoE, four RMSNorms with their own `w`, never `1 + w`):
        h += rms_norm_1(attention(rms_norm(h)))                # GQA, rotate-half RoPE on the full head,
                                                               # q.k * attn_output_multiplier, 30*tanh(./30)
        h += rms_norm_3(moe(rms_norm_2(h)))                    # softmax over all experts, top-2 gates
                                                               # NOT renormalized, gelu(x W) * (x V) U
    logits = (rms_norm_final(h) @ E.T) * output_multiplier_scale   # tied embeddings

Parameters (module attribute paths; weights [in, out]; `layers` stacks every layer on a leading axis):
    embed.embedding [vocab, d]                 final_norm.scale [d]
    layers.{attn_norm, post_attn_norm, moe_norm, post_moe_norm}.scale [L, d]   (release: rms_norm, _1, _2, _3)
    layers.attn.{q [L, d, h, hd], k/v [L, d, kh, hd], o [L, h, hd, d]}.kernel
    layers.router.kernel [L, d, experts]       (float32 whatever the model dtype, as the release routes)
    layers.experts.{gate [L, e, d, f] (W, inside gelu), up [L, e, d, f] (V), down [L, e, f, d] (U)}.kernel
With config.quantization "int8" or "fp8" every attention and expert kernel holds quantized values
with a float32 `kernel_scale` beside it (vishwam_jax/quantization; the release's int8 weights keep
their values where their scales are per output channel); norms, router and embedding stay floating.
Cache: {"pos": [b], "layers": {k, v [L, b, max_len, kh, hd], slot_pos [L, b, max_len]}} (models/attention.py);
paged (`init_paged_cache`): k, v [L, num_blocks, page, kh, hd] and slot_pos [L, num_blocks, page]
page pools, and one "block_table" [b, max_blocks] for every layer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from vishwam_jax.models import stack
from vishwam_jax.models.attention import Attention, init_kv_cache_layer, init_paged_kv_layer
from vishwam_jax.models.interface import Cache, Capabilities, ForwardOutput, chunk_lengths, chunk_positions
from vishwam_jax.models.layers import Embed, RMSNorm
from vishwam_jax.models.moe import Experts, SoftmaxRouter
from vishwam_jax.models.remat import policy_of
from vishwam_jax.models.rope import RotaryEmbedding
from vishwam_jax.quantization import Quantization


class DecoderLayer(nnx.Module):
    """h += post_attn_norm(attn(attn_norm(h))); h += post_moe_norm(moe(moe_norm(h)))."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, eps = config.d_model, config.norm_eps
        quantization = Quantization.of(config)
        # The release multiplies by `w` itself (initialised at 1, the identity), never `1 + w`.
        norm = lambda: RMSNorm(d, eps=eps, plus_one=False, dtype=dtype)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(
            d, config.num_heads, config.num_kv_heads, config.head_dim,
            # Rotate-half RoPE over the full head dimension.
            rope=RotaryEmbedding(config.head_dim, config.rope_theta),
            # The release scales q.k by attn_output_multiplier alone (no extra 1/sqrt(head_dim)),
            # then caps: 30 * tanh(scores / 30); the shared attention applies them in that order.
            scale=config.attn_output_multiplier,
            softcap=config.attn_logit_softcap,
            rngs=rngs, dtype=dtype, quantization=quantization,
        )  # fmt: skip
        self.post_attn_norm = norm()
        self.moe_norm = norm()
        # Softmax over every expert, top-k gates used as they are (not renormalized to sum to 1).
        self.router = SoftmaxRouter(d, config.num_experts, config.num_experts_per_token, renormalize=False, rngs=rngs)
        self.experts = Experts(
            config.num_experts,
            d,
            config.moe_ffn_dim,
            config.activation,
            rngs=rngs,
            dtype=dtype,
            quantization=quantization,
            num_slots=config.num_expert_slots,
        )
        self.post_moe_norm = norm()

    def moe(self, x: Float[Array, "b t d"]) -> tuple[Float[Array, "b t d"], Int[Array, " e"]]:
        """The MoE block on already-normed input: routed in float32, gated-GELU experts through the
        shared sorted dispatch; also the tokens routed to each expert."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        gates, experts = self.router(flat)
        y, counts = self.experts(flat, gates, experts)
        return y.reshape(b, t, d), counts

    def __call__(
        self,
        h: Float[Array, "b t d"],
        positions: Int[Array, "b t"],
        lengths: Int[Array, " b"],
        key_valid: Bool[Array, "b t"],
        cache: dict | None,
    ) -> tuple[Float[Array, "b t d"], dict | None, Int[Array, " e"]]:
        a, cache = self.attn(self.attn_norm(h), positions, lengths, key_valid, cache)
        h = h + self.post_attn_norm(a)
        m, counts = self.moe(self.moe_norm(h))
        return h + self.post_moe_norm(m), cache, counts


class Grok1(nnx.Module):
    capabilities = Capabilities(paged_cache=True, moe=True)

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        # std 1/sqrt(d): times embedding_multiplier_scale (sqrt(d) in the release) gives unit entries.
        self.embed = Embed(config.vocab_size, config.d_model, rngs=rngs, dtype=dtype)
        # Every layer has one structure: one stack, scanned (compile time independent of depth).
        self.layers = stack.stacked(config.num_layers, lambda r: DecoderLayer(config, rngs=r, dtype=dtype), rngs)
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, plus_one=False, dtype=dtype)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
        """One full-length KV slot per position in every layer (Grok-1 has no sliding window),
        stacked [num_layers, ...] like the layers."""
        c = self.config
        one = init_kv_cache_layer(batch, max_len, c.num_kv_heads, c.head_dim, dtype)
        layers = {k: jnp.broadcast_to(v, (c.num_layers, *v.shape)) for k, v in one.items()}
        return {"pos": jnp.zeros((batch,), jnp.int32), "layers": layers}

    def init_paged_cache(self, block_table: Int[Array, "b mb"], num_blocks: int, dtype=jnp.bfloat16) -> Cache:
        """K/V in page pools (inference/paged_cache.py): [num_layers, num_blocks, page, kv_heads,
        head_dim], read through one block table for every layer."""
        c = self.config
        table = jnp.asarray(block_table, jnp.int32)
        one = init_paged_kv_layer(num_blocks, c.num_kv_heads, c.head_dim, dtype)
        layers = {k: jnp.broadcast_to(v, (c.num_layers, *v.shape)) for k, v in one.items()}
        return {"pos": jnp.zeros((table.shape[0],), jnp.int32), "block_table": table, "layers": layers}

    def __call__(
        self,
        tokens: Int[Array, "b t"],
        *,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput:
        """Logits (float32) for a chunk of tokens that continues each row's cache; computation runs
        in the dtype of the embedding table (the release: bfloat16). expert_counts [L, E]: tokens
        routed to each expert per layer (right padding included)."""
        batch, t = tokens.shape
        lengths = chunk_lengths(lengths, batch, t)
        positions = chunk_positions(cache, batch, t)
        # grok1.md writes `tokens > pad_token`; with pad 0 and ids >= 0 that is the same set, and `!=`
        # (the release's model.py) stays right should a config put pad elsewhere. Pad tokens are never
        # visible as keys, also to later decode steps (their cache slots are recorded as empty).
        key_valid: Bool[Array, "b t"] = tokens != self.config.pad_token_id

        def body(layer: DecoderLayer, h, layer_cache):
            return layer(h, positions, lengths, key_valid, layer_cache)

        h = self.embed(tokens, self.config.embedding_multiplier_scale)
        h, layer_caches, counts = stack.scan_paged(
            self.layers, h, None if cache is None else cache["layers"], body,
            block_table=None if cache is None else cache.get("block_table"), paged=True,
            remat_policy=policy_of(self.config), unroll=self.config.scan_unroll,
        )  # fmt: skip
        h = self.final_norm(h)
        at = h if logit_positions is None else jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
        logits = self.unembed(at)
        # {**cache, ...}: a paged cache keeps its block table
        new_cache = None if cache is None else {**cache, "pos": cache["pos"] + lengths, "layers": layer_caches}
        return ForwardOutput(logits=logits, cache=new_cache, hidden=h, expert_counts=counts)

    def unembed(self, hidden: Float[Array, "b k d"]) -> Float[Array, "b k v"]:
        """Tied output: the input embedding table, transposed, then the output multiplier."""
        return self.embed.attend(hidden) * self.config.output_multiplier_scale
