"""DeepSeek-V3 (arXiv:2412.19437), in the order the paper presents it.

    x = embed(tokens)                                           # untied input/output embeddings
    for layer i:  x += mla(rms_norm(x))                         # §2.1.1 multi-head latent attention
                  x += ffn_i(rms_norm(x))                       # SwiGLU for i < num_dense_layers,
                                                                # else §2.1.2 DeepSeekMoE
    h = rms_norm(x);  logits = h @ W_out

    DeepSeekMoE(u) = shared(u) + sum_{e in topk} g_e * expert_e(u)        # SwiGLU experts
        s = sigmoid(u @ W_router)                               # affinities, float32
        topk chosen on s + b (b: the aux-loss-free balancing bias, §2.1.2), restricted to the
        num_groups_per_token groups with the largest sum of their two best biased scores
        g = s[topk] / sum(s[topk]) * routed_scaling_factor     # the bias never enters a gate

    MTP (§2.2), depth k = 1..D, for entry i:                    # predicts t_{i+k+1}
        h^k_i = norm_k(block_k(W_eh [enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)]))
        logits^k_i = h^k_i @ W_out                              # embedding and head shared
    where h^0 is the main model's final (normed) hidden state, as transformers and vLLM feed it.

All norms are RMSNorm multiplying by `w` itself (not Gemma's 1 + w).

Parameters (weights [in, out]; experts stacked [E, ...]):
    embed [V, d]   final_norm [d]   lm_head [d, V]
    layers[i]: attn_norm [d], attn {see models/mla.py}, mlp_norm [d], and either
               mlp {gate, up [d, f], down [f, d]}                                  (dense)
               router [d, E] f32, router_bias [E] f32, experts {gate, up [E, d, fe], down [E, fe, d]},
               shared {gate, up [d, fe * shared], down [fe * shared, d]}            (MoE)
    mtp[k]: enorm, hnorm [d], eh_proj [2d, d], block {an MoE layer}, norm [d]
Cache: {"pos": [b] next position per row, "layers": [{"kv": [b, max_len, kv_lora + rope]}]}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from vishwam_jax.models import mla
from vishwam_jax.models.attention import chunk_positions
from vishwam_jax.models.layers import embed, gated_mlp, init_dense, rms_norm
from vishwam_jax.models.moe import dispatch_experts, grouped_sigmoid_router
from vishwam_jax.models.remat import remat_layer


def is_moe_layer(config, i: int) -> bool:
    return i >= config.num_dense_layers


# -- parameters ------------------------------------------------------------------------------------
def _init_layer(config, key: jax.Array, dtype, moe: bool) -> dict:
    d, e, fe = config.d_model, config.num_experts, config.moe_ffn_dim
    keys = iter(jax.random.split(key, 8))
    layer = {
        "attn_norm": jnp.ones((d,), dtype),
        "attn": mla.init_params(config, next(keys), dtype),
        "mlp_norm": jnp.ones((d,), dtype),
    }
    if not moe:
        f = config.ffn_dim
        layer["mlp"] = {
            "gate": init_dense(next(keys), (d, f), d, dtype),
            "up": init_dense(next(keys), (d, f), d, dtype),
            "down": init_dense(next(keys), (f, d), f, dtype),
        }
        return layer
    fs = fe * config.num_shared_experts
    # Routing is done in float32 whatever the weights (the release keeps gate and bias in float32).
    layer["router"] = init_dense(next(keys), (d, e), d, jnp.float32)
    layer["router_bias"] = jnp.zeros((e,), jnp.float32)
    layer["experts"] = {
        "gate": init_dense(next(keys), (e, d, fe), d, dtype),
        "up": init_dense(next(keys), (e, d, fe), d, dtype),
        "down": init_dense(next(keys), (e, fe, d), fe, dtype),
    }
    layer["shared"] = {
        "gate": init_dense(next(keys), (d, fs), d, dtype),
        "up": init_dense(next(keys), (d, fs), d, dtype),
        "down": init_dense(next(keys), (fs, d), fs, dtype),
    }
    return layer


def init_params(config, key: jax.Array, dtype=jnp.float32) -> dict:
    d, v = config.d_model, config.vocab_size
    k_embed, k_head, k_layers, k_mtp = jax.random.split(key, 4)
    layer_keys = jax.random.split(k_layers, config.num_layers)
    params = {
        "embed": init_dense(k_embed, (v, d), 1, dtype),  # unit entries: the embedding is not scaled
        "layers": [_init_layer(config, layer_keys[i], dtype, is_moe_layer(config, i)) for i in range(config.num_layers)],
        "final_norm": jnp.ones((d,), dtype),
        "lm_head": init_dense(k_head, (d, v), d, dtype),
    }
    if config.num_mtp_layers:
        mtp_keys = jax.random.split(k_mtp, 2 * config.num_mtp_layers)
        params["mtp"] = [
            {
                "enorm": jnp.ones((d,), dtype),
                "hnorm": jnp.ones((d,), dtype),
                "eh_proj": init_dense(mtp_keys[2 * k], (2 * d, d), 2 * d, dtype),
                "block": _init_layer(config, mtp_keys[2 * k + 1], dtype, moe=True),
                "norm": jnp.ones((d,), dtype),
            }
            for k in range(config.num_mtp_layers)
        ]
    return params


def init_cache(config, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """The latent cache: kv_lora_rank + qk_rope_head_dim values per token per layer (576 for the
    released model: ~70 KB per token in bf16 over 61 layers, against ~5 MB for per-head K/V)."""
    layers = [mla.init_cache_layer(config, batch, max_len, dtype) for _ in range(config.num_layers)]
    return {"pos": jnp.zeros((batch,), jnp.int32), "layers": layers}


def init_mtp_cache(config, batch: int, max_len: int, dtype=jnp.bfloat16, depth: int = 0) -> dict:
    """The latent cache of one MTP module's block (same layout as one main layer's)."""
    del depth  # every depth has the same shape; the argument documents which one a cache serves
    return {"pos": jnp.zeros((batch,), jnp.int32), "layers": [mla.init_cache_layer(config, batch, max_len, dtype)]}


# -- blocks ----------------------------------------------------------------------------------------
def moe(layer: dict, x: Float[Array, "b t d"], config) -> tuple[Float[Array, "b t d"], Int[Array, "e"]]:
    """DeepSeekMoE: group-limited sigmoid routing (bias for selection only) through the shared
    sorted dispatch, plus the always-on shared expert. Also the tokens routed to each expert."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    gates, experts = grouped_sigmoid_router(
        flat,
        layer["router"],
        layer["router_bias"],
        config.num_experts_per_token,
        num_groups=config.num_expert_groups,
        topk_groups=config.num_groups_per_token,
        routed_scaling_factor=config.routed_scaling_factor,
        renormalize=config.norm_topk_prob,
    )
    routed, counts = dispatch_experts(flat, gates, experts, layer["experts"], config.activation, config.num_experts)
    y = routed + gated_mlp(flat, layer["shared"], config.activation)
    return y.reshape(b, t, d), counts


def decoder_layer(
    layer: dict,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, "b"],
    cache: dict | None,
    config,
) -> tuple[Float[Array, "b t d"], dict | None, Int[Array, "e"] | None]:
    """Pre-norm residual block: MLA (naive form without a cache, absorbed over the latent cache
    with one), then the dense SwiGLU or the MoE. Returns (x, cache, expert counts or None)."""
    norm = lambda v, w: rms_norm(v, w, config.norm_eps)
    h = norm(x, layer["attn_norm"])
    if cache is None:
        a = mla.naive_attention(layer["attn"], h, positions, config)
    else:
        a, cache = mla.cached_attention(layer["attn"], h, positions, lengths, cache, config)
    x = x + a
    h = norm(x, layer["mlp_norm"])
    if "experts" in layer:
        m, counts = moe(layer, h, config)
    else:
        m, counts = gated_mlp(h, layer["mlp"], config.activation), None
    return x + m, cache, counts


def _logits(params: dict, h: Float[Array, "b t d"], logit_positions) -> Float[Array, "b k v"]:
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
    return jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(h.dtype), preferred_element_type=jnp.float32)


# -- the model -------------------------------------------------------------------------------------
def forward_with_aux(
    params: dict,
    tokens: Int[Array, "b t"],
    config,
    *,
    cache: dict | None = None,
    lengths: Int[Array, "b"] | None = None,
    logit_positions: Int[Array, "b k"] | None = None,
) -> tuple[Float[Array, "b k v"], dict | None, dict]:
    """`forward`, plus aux = {"hidden": the final normed hidden state [b, t, d] (the MTP input),
    "expert_counts": tokens routed to each expert [num_moe_layers, E] int32 (padding included:
    it occupies experts too)}."""
    batch, t = tokens.shape
    lengths = jnp.full((batch,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    positions = chunk_positions(cache, batch, t)
    x = embed(tokens, params["embed"])
    new_layers, counts = [], []
    # Each layer under the activation-checkpointing policy of config.remat_policy (training).
    block = remat_layer(functools.partial(decoder_layer, config=config), config)
    for i, layer in enumerate(params["layers"]):
        x, layer_cache, c = block(layer, x, positions, lengths, None if cache is None else cache["layers"][i])
        new_layers.append(layer_cache)
        if c is not None:
            counts.append(c)
    h = rms_norm(x, params["final_norm"], config.norm_eps)
    logits = _logits(params, h, logit_positions)
    new_cache = None if cache is None else {"pos": cache["pos"] + lengths, "layers": new_layers}
    num_experts = config.num_experts
    aux = {"hidden": h, "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, num_experts), jnp.int32)}
    return logits, new_cache, aux


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

    cache=None: a full causal forward (naive MLA). With a cache, the chunk starts at cache["pos"]
      per row and attends through the latent cache (absorbed MLA).
    lengths: how many of the chunk's tokens belong to each row (the rest is right padding and is
      neither attended to nor cached); defaults to all of them.
    logit_positions: chunk indices at which to compute logits (default: every position).
    """
    logits, cache, _ = forward_with_aux(params, tokens, config, cache=cache, lengths=lengths, logit_positions=logit_positions)
    return logits, cache


# -- multi-token prediction ------------------------------------------------------------------------
def mtp_forward(
    params: dict,
    hidden: Float[Array, "b t d"],
    next_tokens: Int[Array, "b t"],
    config,
    *,
    depth: int = 0,
    cache: dict | None = None,
    lengths: Int[Array, "b"] | None = None,
    logit_positions: Int[Array, "b k"] | None = None,
) -> tuple[Float[Array, "b k v"], dict | None, dict]:
    """MTP module `depth` (0-based) over entries i: hidden[i] = h^{depth}_i and next_tokens[i] =
    t_{i+depth+1}; logits predict t_{i+depth+2}. aux["hidden"] is h^{depth+1} (the next depth's input).

    Entry i runs at rope position i (the cache's slot i). transformers places it at i + 1, the
    position of its token; rope scores depend only on position differences, so both agree.
    """
    m = params["mtp"][depth]
    batch, t = next_tokens.shape
    lengths = jnp.full((batch,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    positions = chunk_positions(cache, batch, t)
    norm = lambda v, w: rms_norm(v, w, config.norm_eps)
    e = embed(next_tokens, params["embed"]).astype(hidden.dtype)
    x = jnp.einsum("btc,cd->btd", jnp.concatenate([norm(e, m["enorm"]), norm(hidden, m["hnorm"])], axis=-1), m["eh_proj"].astype(hidden.dtype))
    block = remat_layer(functools.partial(decoder_layer, config=config), config)
    x, layer_cache, counts = block(m["block"], x, positions, lengths, None if cache is None else cache["layers"][0])
    h = norm(x, m["norm"])
    logits = _logits(params, h, logit_positions)
    new_cache = None if cache is None else {"pos": cache["pos"] + lengths, "layers": [layer_cache]}
    return logits, new_cache, {"hidden": h, "expert_counts": counts[None]}


def mtp_loss(
    params: dict,
    tokens: Int[Array, "b t"],
    config,
    *,
    hidden: Float[Array, "b t d"] | None = None,
    loss_mask: Float[Array, "b t"] | None = None,
) -> Float[Array, ""]:
    """(1/D) sum_k L_MTP^k (§2.2): the mean cross-entropy of each depth k predicting t_{i+k+1};
    the caller weights it by λ. hidden: the main model's aux["hidden"] on `tokens` (recomputed when
    omitted). loss_mask [b, t]: weight of each *target* position (e.g. 0 on padding)."""
    depths = config.num_mtp_layers
    t = tokens.shape[1]
    if t < depths + 2:
        raise ValueError(f"MTP depth {depths} needs sequences of at least {depths + 2} tokens, got {t}")
    if hidden is None:
        _, _, aux = forward_with_aux(params, tokens, config)
        hidden = aux["hidden"]
    mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    losses = []
    for k in range(1, depths + 1):
        n = t - k  # entries i = 0 .. t-k-1 (the last has no target and only feeds deeper depths)
        logits, _, aux = mtp_forward(params, hidden[:, :n], tokens[:, k:], config, depth=k - 1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, k + 1 :])
        w = mask[:, k + 1 :]
        losses.append(jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0))
        hidden = aux["hidden"][:, : n - 1]
    return jnp.mean(jnp.stack(losses))


# -- auxiliary-loss-free load balancing ------------------------------------------------------------
def update_router_bias(bias: Float[Array, "... e"], counts: Int[Array, "... e"], gamma: float) -> Float[Array, "... e"]:
    """§2.1.2: raise the bias of under-loaded experts and lower it for over-loaded ones by the
    bias update speed γ: b_e += γ · sign(mean_load − load_e) (per layer, over the last axis)."""
    load = counts.astype(jnp.float32)
    step = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return (bias.astype(jnp.float32) + step).astype(bias.dtype)


def update_router_biases(params: dict, expert_counts: Int[Array, "l e"], gamma: float) -> dict:
    """`update_router_bias` for every MoE layer of the main model, from aux["expert_counts"]
    (summed over the batches of a step); returns new params with only the biases changed."""
    moe_layers = [i for i, layer in enumerate(params["layers"]) if "router_bias" in layer]
    if len(moe_layers) != expert_counts.shape[0]:
        raise ValueError(f"{expert_counts.shape[0]} rows of expert counts for {len(moe_layers)} MoE layers")
    layers = list(params["layers"])
    for row, i in enumerate(moe_layers):
        layers[i] = {**layers[i], "router_bias": update_router_bias(layers[i]["router_bias"], expert_counts[row], gamma)}
    return {**params, "layers": layers}
