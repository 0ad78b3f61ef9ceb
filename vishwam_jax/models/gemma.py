"""Gemma 1, 2 and 3 (text): one forward, configured per generation.

    x = embed(tokens) * sqrt(d)
    for each layer:   x += [post_norm](attention(norm(x)))      # GQA/MQA, RoPE, soft-cap, window, QK-norm
                      x += [post_norm](geglu_mlp(norm(x)))
    logits = soft_cap(norm(x) @ embed.T)                          # tied embeddings

All norms are RMSNorm with Gemma's `1 + w` scale.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vishwam_jax.models.attention import chunk_positions, gqa_self_attention, init_kv_cache_layer
from vishwam_jax.models.layers import embed, gated_mlp, init_dense, rms_norm, soft_cap
from vishwam_jax.models.rope import inverse_frequencies
from vishwam_jax.models.remat import remat_layer


def _is_sliding(config, i: int) -> bool:
    return bool(config.sliding_window) and config.layer_types[i] == "sliding"


def init_params(config, key: jax.Array, dtype=jnp.float32) -> dict:
    d, h, kh, hd, f = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.ffn_dim
    keys = iter(jax.random.split(key, 2 + 7 * config.num_layers))
    zeros = lambda n: jnp.zeros((n,), dtype)  # 1 + 0: identity norms
    layers = []
    for _ in range(config.num_layers):
        layer = {
            "attn_norm": zeros(d),
            "attn": {
                "q": init_dense(next(keys), (d, h, hd), d, dtype),
                "k": init_dense(next(keys), (d, kh, hd), d, dtype),
                "v": init_dense(next(keys), (d, kh, hd), d, dtype),
                "o": init_dense(next(keys), (h, hd, d), h * hd, dtype),
            },
            "mlp_norm": zeros(d),
            "mlp": {
                "gate": init_dense(next(keys), (d, f), d, dtype),
                "up": init_dense(next(keys), (d, f), d, dtype),
                "down": init_dense(next(keys), (f, d), f, dtype),
            },
        }
        if config.use_qk_norm:
            layer["attn"]["q_norm"] = zeros(hd)
            layer["attn"]["k_norm"] = zeros(hd)
        if config.use_post_attn_norm:
            layer["post_attn_norm"] = zeros(d)
        if config.use_post_ffw_norm:
            layer["post_mlp_norm"] = zeros(d)
        layers.append(layer)
    return {
        # Scaled so that embed * sqrt(d) has unit-variance entries.
        "embed": init_dense(next(keys), (config.vocab_size, d), d, dtype),
        "layers": layers,
        "final_norm": zeros(d),
    }


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Full-length slots for global layers, a ring of `sliding_window` slots for local ones."""
    layers = []
    for i in range(config.num_layers):
        slots = min(config.sliding_window, max_len) if _is_sliding(config, i) else max_len
        layers.append(init_kv_cache_layer(batch, slots, config.num_kv_heads, config.head_dim, dtype))
    return {"pos": jnp.zeros((batch,), jnp.int32), "layers": layers}


def rope_tables(config) -> dict:
    return {
        "full": inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_type, config.rope_scaling_factor),
        "sliding": inverse_frequencies(config.head_dim, config.rope_local_theta),
    }


def _layer(layer: dict, x: Float[Array, "b t d"], layer_cache, positions, lengths, key_valid, *, config, sliding: bool, inv_freq):
    """x += [post_norm](attention(norm(x))); x += [post_norm](geglu_mlp(norm(x)))."""
    eps = config.norm_eps
    norm = lambda x, w: rms_norm(x, w, eps, plus_one=True)
    h, layer_cache = gqa_self_attention(
        layer["attn"],
        norm(x, layer["attn_norm"]),
        positions,
        lengths,
        key_valid,
        layer_cache,
        inv_freq=inv_freq,
        scale=config.query_pre_attn_scalar**-0.5,
        softcap=config.attn_logit_softcap,
        window=config.sliding_window if sliding else 0,
        qk_norm_eps=eps if config.use_qk_norm else None,
    )
    if config.use_post_attn_norm:
        h = norm(h, layer["post_attn_norm"])
    x = x + h
    h = gated_mlp(norm(x, layer["mlp_norm"]), layer["mlp"], config.activation)
    if config.use_post_ffw_norm:
        h = norm(h, layer["post_mlp_norm"])
    return x + h, layer_cache


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
    """
    batch, t = tokens.shape
    lengths = jnp.full((batch,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    positions = chunk_positions(cache, batch, t)
    key_valid = jnp.ones((batch, t), bool)
    ropes = rope_tables(config)
    eps = config.norm_eps
    norm = lambda x, w: rms_norm(x, w, eps, plus_one=True)

    x = embed(tokens, params["embed"], math.sqrt(config.d_model))
    new_layers = []
    for i, layer in enumerate(params["layers"]):
        sliding = _is_sliding(config, i)
        # One layer's body under the activation-checkpointing policy of config.remat_policy.
        block = remat_layer(functools.partial(_layer, config=config, sliding=sliding, inv_freq=ropes["sliding" if sliding else "full"]), config)
        x, layer_cache = block(layer, x, None if cache is None else cache["layers"][i], positions, lengths, key_valid)
        new_layers.append(layer_cache)

    x = norm(x, params["final_norm"])
    if logit_positions is not None:
        x = jnp.take_along_axis(x, logit_positions[:, :, None], axis=1)
    logits = jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    logits = soft_cap(logits, config.final_logit_softcap)
    new_cache = None if cache is None else {"pos": cache["pos"] + lengths, "layers": new_layers}
    return logits, new_cache
