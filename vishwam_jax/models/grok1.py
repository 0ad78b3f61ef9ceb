"""Grok-1 (xAI's open release), step by step as shared/docs/grok1.md states it.

    key_valid = tokens != pad                                  # padding is masked as keys
    h = E[tokens] * embedding_multiplier_scale
    for each layer (every one MoE, four RMSNorms with their own `w`, never `1 + w`):
        h += rms_norm_1(attention(rms_norm(h)))                # GQA, rotate-half RoPE on the full head,
                                                               # q.k * attn_output_multiplier, 30*tanh(./30)
        h += rms_norm_3(moe(rms_norm_2(h)))                    # softmax over all experts, top-2 gates
                                                               # NOT renormalized, gelu(x W) * (x V) U
    logits = (rms_norm_final(h) @ E.T) * output_multiplier_scale   # tied embeddings

Parameters (weights [in, out]; any matmul weight may be weight-only int8, {"int8", "scale"}):
    embed [vocab, d]            final_norm [d]
    layers[i]: attn_norm, post_attn_norm, moe_norm, post_moe_norm [d]   (release: rms_norm, _1, _2, _3)
               attn: q [d, h, hd], k/v [d, kh, hd], o [h, hd, d]
               router [d, experts]
               moe: gate [e, d, f] (W, inside gelu), up [e, d, f] (V), down [e, f, d] (U)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vishwam_jax.models.attention import chunk_positions, gqa_self_attention, init_kv_cache_layer
from vishwam_jax.models.layers import embed, init_dense, rms_norm
from vishwam_jax.models.moe import dispatch_experts, softmax_topk_router
from vishwam_jax.models.rope import inverse_frequencies
from vishwam_jax.models.remat import remat_layer


def init_params(config, key: jax.Array, dtype=jnp.float32) -> dict:
    d, h, kh, hd = config.d_model, config.num_q_heads, config.num_kv_heads, config.key_size
    e, f = config.num_experts, config.ffn_dim
    keys = iter(jax.random.split(key, 1 + 8 * config.num_layers))
    ones = lambda: jnp.ones((d,), dtype)  # the release multiplies by `w` itself: 1 is the identity
    layers = []
    for _ in range(config.num_layers):
        layers.append(
            {
                "attn_norm": ones(),
                "attn": {
                    "q": init_dense(next(keys), (d, h, hd), d, dtype),
                    "k": init_dense(next(keys), (d, kh, hd), d, dtype),
                    "v": init_dense(next(keys), (d, kh, hd), d, dtype),
                    "o": init_dense(next(keys), (h, hd, d), h * hd, dtype),
                },
                "post_attn_norm": ones(),
                "moe_norm": ones(),
                # The release keeps the router in float32 and routes in float32 whatever the weights.
                "router": init_dense(next(keys), (d, e), d, jnp.float32),
                "moe": {
                    "gate": init_dense(next(keys), (e, d, f), d, dtype),
                    "up": init_dense(next(keys), (e, d, f), d, dtype),
                    "down": init_dense(next(keys), (e, f, d), f, dtype),
                },
                "post_moe_norm": ones(),
            }
        )
    return {
        # std 1/sqrt(d): times embedding_multiplier_scale (sqrt(d) in the release) gives unit entries.
        "embed": init_dense(next(keys), (config.vocab_size, d), d, dtype),
        "layers": layers,
        "final_norm": ones(),
    }


def init_cache(config, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """One full-length KV slot per position in every layer (Grok-1 has no sliding window)."""
    layers = [init_kv_cache_layer(batch, max_len, config.num_kv_heads, config.key_size, dtype) for _ in range(config.num_layers)]
    return {"pos": jnp.zeros((batch,), jnp.int32), "layers": layers}


def moe(layer: dict, x: Float[Array, "b t d"], config) -> Float[Array, "b t d"]:
    """Softmax router over all experts in float32, top-k gates used as they are (not renormalized
    to sum to 1), then the gated-GELU experts through the shared sorted dispatch."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    gates, experts = softmax_topk_router(flat, layer["router"], config.num_selected_experts, renormalize=False)
    y, _ = dispatch_experts(flat, gates, experts, layer["moe"], config.activation, config.num_experts)
    return y.reshape(b, t, d)


def decoder_layer(layer: dict, h: Float[Array, "b t d"], positions, lengths, key_valid, layer_cache, *, config, inv_freq):
    """h += rms_norm_1(attention(rms_norm(h))); h += rms_norm_3(moe(rms_norm_2(h)))."""
    norm = lambda x, w: rms_norm(x, w, config.norm_eps, plus_one=False)
    a, layer_cache = gqa_self_attention(
        layer["attn"],
        norm(h, layer["attn_norm"]),
        positions,
        lengths,
        key_valid,
        layer_cache,
        inv_freq=inv_freq,
        # The release scales q.k by attn_output_multiplier alone (no extra 1/sqrt(head_dim)),
        # then caps: 30 * tanh(scores / 30); the shared attention applies them in that order.
        scale=config.attn_output_multiplier,
        softcap=config.attn_logit_softcap,
    )
    h = h + norm(a, layer["post_attn_norm"])
    m = moe(layer, norm(h, layer["moe_norm"]), config)
    return h + norm(m, layer["post_moe_norm"]), layer_cache


def forward(
    params: dict,
    tokens: Int[Array, "b t"],
    config,
    *,
    cache: dict | None = None,
    lengths: Int[Array, "b"] | None = None,
    logit_positions: Int[Array, "b k"] | None = None,
) -> tuple[Float[Array, "b k v"], dict | None]:
    """Logits (float32) for a chunk of tokens that continues each row's cache.

    lengths: how many of the chunk's tokens belong to each row (the rest is right padding and is
      neither attended to nor cached); defaults to all of them.
    logit_positions: chunk indices at which to compute logits (default: every position).
    Computation runs in the dtype of the embedding table (the release: bfloat16).
    """
    batch, t = tokens.shape
    lengths = jnp.full((batch,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    positions = chunk_positions(cache, batch, t)
    # grok1.md writes `tokens > pad_token`; with pad 0 and ids >= 0 that is the same set, and `!=`
    # (the release's model.py) stays right should a config put pad elsewhere. Pad tokens are never
    # visible as keys, also to later decode steps (their cache slots are recorded as empty).
    key_valid = tokens != config.pad_token_id
    inv_freq = inverse_frequencies(config.key_size, config.rope_theta)  # full head dim, rotate-half
    norm = lambda x, w: rms_norm(x, w, config.norm_eps, plus_one=False)

    h = embed(tokens, params["embed"], config.embedding_multiplier_scale)
    new_layers = []
    # Each layer under the activation-checkpointing policy of config.remat_policy (training).
    block = remat_layer(functools.partial(decoder_layer, config=config, inv_freq=inv_freq), config)
    for i, layer in enumerate(params["layers"]):
        h, layer_cache = block(layer, h, positions, lengths, key_valid, None if cache is None else cache["layers"][i])
        new_layers.append(layer_cache)

    h = norm(h, params["final_norm"])
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
    # Tied output: the input embedding table, transposed.
    logits = jnp.einsum("btd,vd->btv", h, params["embed"].astype(h.dtype), preferred_element_type=jnp.float32)
    logits = logits * config.output_multiplier_scale
    new_cache = None if cache is None else {"pos": cache["pos"] + lengths, "layers": new_layers}
    return logits, new_cache
