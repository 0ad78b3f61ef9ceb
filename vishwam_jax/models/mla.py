"""Multi-head latent attention (DeepSeek-V2/V3), in its two equivalent forms.

Per token, MLA keeps one compressed vector: the RMS-normalised latent c_kv = norm(x W_kv_a)[:r]
(r = kv_lora_rank = 512) and one rope key k_pe = rope(x W_kv_a[r:]) (64 dims) shared by every head.
Per head h, keys and values are linear in the latent:

    k_h = [c_kv W_k_b[:, h] ; k_pe]        v_h = c_kv W_v_b[:, h]
    q_h = [q_nope_h ; rope(q_pe_h)]        (q from norm(x W_q_a) W_q_b: a low-rank query)

naive form (cache-less forward: training, `Model.logits`): materialise k_h, v_h for every head and
attend (192-dim q.k) with `pallas_kernels.mla_attention.mla_prefill`.
absorbed form (every forward through the cache: prefill and decode): fold W_k_b into the query and
W_v_b into the output,

    q_h . k_h = (q_nope_h W_k_b[:, h]^T) . c_kv + q_pe_h . k_pe
    o_h       = (sum_s p_hs c_kv_s) W_v_b[:, h]

so attention runs directly on the cache of [c_kv ; k_pe] (576 values per token per layer, not
2 x 128 heads x 128-192 per token) with `mla_attention.mla_decode` — the "absorb" mode of the
official inference code (its default for prefill too).

Parameters of one layer (weights [in, out], heads as their own axis):
    wq_a [d, q_lora]  q_norm [q_lora]  wq_b [q_lora, h, nope + rope]     (or wq [d, h, nope + rope]
                                                                           when q_lora_rank == 0)
    wkv_a [d, r + rope]  kv_norm [r]  wk_b [r, h, nope]  wv_b [r, h, v]  wo [h, v, d]
Cache of one layer: {"kv": [b, max_len, r + rope]}; slot p holds the token at position p.
Paged (inference/paged_cache.py): {"kv": [num_blocks, page, r + rope], "block_table": [b, max_blocks]};
token p of row b lives at kv[block_table[b, p // page], p % page].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.models.layers import init_dense, linear, rms_norm
from vishwam_jax.models.rope import apply_rope, inverse_frequencies, yarn_mscale
from vishwam_jax.pallas_kernels.mla_attention import mla_decode, mla_prefill
from vishwam_jax.sharding.context import per_device


# -- configuration-derived constants ---------------------------------------------------------------
def rope_table(config) -> np.ndarray:
    """Inverse frequencies of the 64-dim rope part (YaRN-stretched for the 128K context)."""
    if config.rope_scaling_type == "yarn":
        return inverse_frequencies(
            config.qk_rope_head_dim,
            config.rope_theta,
            "yarn",
            config.rope_scaling_factor,
            original_max_len=config.rope_original_max_len,
            beta_fast=config.rope_beta_fast,
            beta_slow=config.rope_beta_slow,
        )
    return inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling_type, config.rope_scaling_factor)


def rope_attention_factor(config) -> float:
    """YaRN's factor on cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim) (1 for DeepSeek-V3,
    whose two mscales are equal)."""
    if config.rope_scaling_type != "yarn":
        return 1.0
    f = config.rope_scaling_factor
    if config.rope_mscale and config.rope_mscale_all_dim:
        return yarn_mscale(f, config.rope_mscale) / yarn_mscale(f, config.rope_mscale_all_dim)
    return yarn_mscale(f)


def softmax_scale(config) -> float:
    """1/sqrt(nope + rope) times YaRN's temperature correction squared: the logits of a stretched
    context are sharpened once for q and once for k."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    if config.rope_scaling_type == "yarn" and config.rope_mscale_all_dim:
        scale *= yarn_mscale(config.rope_scaling_factor, config.rope_mscale_all_dim) ** 2
    return scale


# -- parameters and cache --------------------------------------------------------------------------
def init_params(config, key: jax.Array, dtype) -> dict:
    d, h, r = config.d_model, config.num_heads, config.kv_lora_rank
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    k = iter(jax.random.split(key, 7))
    params = {}
    if config.q_lora_rank:
        q = config.q_lora_rank
        params["wq_a"] = init_dense(next(k), (d, q), d, dtype)
        params["q_norm"] = jnp.ones((q,), dtype)
        params["wq_b"] = init_dense(next(k), (q, h, nope + rope), q, dtype)
    else:
        params["wq"] = init_dense(next(k), (d, h, nope + rope), d, dtype)
    params["wkv_a"] = init_dense(next(k), (d, r + rope), d, dtype)
    params["kv_norm"] = jnp.ones((r,), dtype)
    params["wk_b"] = init_dense(next(k), (r, h, nope), r, dtype)
    params["wv_b"] = init_dense(next(k), (r, h, v), r, dtype)
    params["wo"] = init_dense(next(k), (h, v, d), h * v, dtype)
    return params


def init_cache_layer(config, batch: int, max_len: int, dtype) -> dict:
    """The latent cache of one layer: kv_lora_rank + qk_rope_head_dim values per token (576)."""
    return {"kv": jnp.zeros((batch, max_len, config.kv_lora_rank + config.qk_rope_head_dim), dtype)}


# -- projections shared by both forms --------------------------------------------------------------
def queries(params: dict, x: Float[Array, "b t d"], positions: Int[Array, "b t"], config) -> tuple[Array, Array]:
    """q_nope [b, t, h, nope] and the rotated q_pe [b, t, h, rope]."""
    eps = config.norm_eps
    if config.q_lora_rank:
        q = linear(rms_norm(linear(x, params["wq_a"], "btd,dq->btq"), params["q_norm"], eps), params["wq_b"], "btq,qhk->bthk")
    else:
        q = linear(x, params["wq"], "btd,dhk->bthk")
    q_nope, q_pe = q[..., : config.qk_nope_head_dim], q[..., config.qk_nope_head_dim :]
    q_pe = apply_rope(q_pe, positions, rope_table(config), interleaved=config.rope_interleaved, attention_factor=rope_attention_factor(config))
    return q_nope, q_pe


def latents(params: dict, x: Float[Array, "b t d"], positions: Int[Array, "b t"], config) -> Float[Array, "b t c"]:
    """What the cache holds per token: [norm(c_kv) ; rope(k_pe)] ([b, t, kv_lora_rank + rope])."""
    r = config.kv_lora_rank
    kv = linear(x, params["wkv_a"], "btd,dc->btc")
    c_kv = rms_norm(kv[..., :r], params["kv_norm"], config.norm_eps)
    k_pe = apply_rope(
        kv[..., None, r:],  # one rope "head" [b, t, 1, rope], shared by all query heads
        positions,
        rope_table(config),
        interleaved=config.rope_interleaved,
        attention_factor=rope_attention_factor(config),
    )[:, :, 0]
    return jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)


# -- the naive form --------------------------------------------------------------------------------
def naive_attention(
    params: dict,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    config,
    kv: Float[Array, "b t c"] | None = None,
) -> Float[Array, "b t d"]:
    """Causal self-attention within the chunk with per-head keys/values materialised from the
    latents `kv` (computed here if not given; the chunk starts at position 0: no cache). Right
    padding needs no mask of its own: a valid query never sees a later (padded) key."""
    r, h = config.kv_lora_rank, config.num_heads
    q_nope, q_pe = queries(params, x, positions, config)
    kv = latents(params, x, positions, config) if kv is None else kv
    c_kv, k_pe = kv[..., :r], kv[..., r:]
    k_nope = linear(c_kv, params["wk_b"], "bsc,chn->bshn")
    v = linear(c_kv, params["wv_b"], "bsc,chv->bshv")
    q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_pe.shape[:2] + (h, k_pe.shape[-1]))  # shared by every head
    k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
    # Per device under a mesh, like the decode kernel: XLA cannot partition the Pallas kernel, and
    # cuDNN's partitioner refuses the sequence-dim sharding GSPMD may pick when a batch of 1 does
    # not divide the batch axes.
    names = ("batch", "length", "heads", None)
    prefill = functools.partial(mla_prefill, softmax_scale=softmax_scale(config), causal=True)
    out = per_device(prefill, (q, k, v), (names, names, names), names)
    return linear(out, params["wo"], "bthv,hvd->btd")


# -- the absorbed form over the latent cache -------------------------------------------------------
def write_latents(
    cache: dict, kv: Float[Array, "b t c"], positions: Int[Array, "b t"], lengths: Int[Array, "b"]
) -> dict:
    """Store each row's first lengths[b] chunk tokens at their positions' slots; the padding after
    them is sent out of range and dropped (it must not land on a live slot)."""
    if "block_table" in cache:
        return {**cache, "kv": paged_cache.write_tokens(cache["kv"], cache["block_table"], kv, positions, lengths)}
    batch, slots = cache["kv"].shape[:2]
    in_row = jnp.arange(kv.shape[1])[None, :] < lengths[:, None]
    slot = jnp.where(in_row, positions, slots)
    rows = jnp.arange(batch)[:, None]
    return {"kv": cache["kv"].at[rows, slot].set(kv.astype(cache["kv"].dtype), mode="drop")}


# A prompt entering an empty cache attends in the naive form when its chunk is long: causal
# self-attention over t tokens with 192-dim keys and 128-dim values costs ~t²·h·320 FLOPs against
# the absorbed form's ~2·t²·h·1088 over latent keys, and runs on the prefill kernels (cuDNN's MLA on
# GPU) rather than the decode kernel. Both write the same latents, so decoding continues either way.
NAIVE_PREFILL_MIN_TOKENS = 64


def cached_attention(
    params: dict,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, "b"],
    cache: dict,
    config,
) -> tuple[Float[Array, "b t d"], dict]:
    """Attention of a chunk that continues each row's cache; the cache with the chunk's latents."""
    if x.shape[1] < NAIVE_PREFILL_MIN_TOKENS:
        return absorbed_attention(params, x, positions, lengths, cache, config)

    def naive(cache):
        kv = latents(params, x, positions, config)
        return naive_attention(params, x, positions, config, kv), write_latents(cache, kv, positions, lengths)

    def absorbed(cache):
        return absorbed_attention(params, x, positions, lengths, cache, config)

    return jax.lax.cond(jnp.all(positions[:, 0] == 0), naive, absorbed, cache)


def absorbed_attention(
    params: dict,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, "b"],
    cache: dict,
    config,
) -> tuple[Float[Array, "b t d"], dict]:
    """Write the chunk's latents, then attend from W_k_b-absorbed queries over the whole latent
    cache and map the latent output through W_v_b and W_o.

    Writing before attending makes rewinding free: a chunk starting at position p overwrites the
    slots from p on before any query reads them, so slots left by rejected speculative tokens are
    never seen (a query at position p + i reads only slots <= p + i).
    """
    r = config.kv_lora_rank
    q_nope, q_pe = queries(params, x, positions, config)
    kv = latents(params, x, positions, config)
    cache = write_latents(cache, kv, positions, lengths)
    q_latent = linear(q_nope, params["wk_b"], "bthn,chn->bthc")
    q = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1)
    # Every chunk token counts as written for the visibility rule; padded queries' outputs are unused.
    total = positions[:, 0] + x.shape[1]
    # Per device under a mesh: the decode kernel is a Pallas call that XLA cannot partition. Batch
    # rows (and heads under tensor parallelism) are independent; a paged pool is indexed by global
    # block ids, so it stays whole and only the block table is split.
    names_q, names_out = ("batch", "length", "heads", None), ("batch", "length", "heads", None)
    decode = functools.partial(mla_decode, softmax_scale=softmax_scale(config), v_head_dim=r)
    if "block_table" in cache:
        o_latent = per_device(lambda q_, kv, n, table: decode(q_, kv, n, block_table=table),
                              (q, cache["kv"], total, cache["block_table"]),
                              (names_q, None, ("batch",), ("batch", None)), names_out)
    else:
        o_latent = per_device(decode, (q, cache["kv"], total), (names_q, ("batch", None, None), ("batch",)), names_out)
    out = linear(o_latent.astype(x.dtype), params["wv_b"], "bthc,chv->bthv")
    return linear(out, params["wo"], "bthv,hvd->btd"), cache
