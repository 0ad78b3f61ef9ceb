"""Multi-head latent attention (DeepSeek-V2/V3), in its two equivalent forms.

Per token, MLA keeps one compressed vector: the RMS-normalised latent c_kv = norm(x W_kv_a)[:r]
(r = kv_lora_rank = 512) and one rope key k_pe = rope(x W_kv_a[r:]) (64 dims) shared by every head.
Per head h, keys and values are linear in the latent:

    k_h = [c_kv W_k_b[:, h] ; k_pe]        v_h = c_kv W_v_b[:, h]
    q_h = [q_nope_h ; rope(q_pe_h)]        (q from norm(x W_q_a) W_q_b: a low-rank query)

naive form (cache-less forward: training, `Model.logits`; and a long prompt entering an empty
cache): materialise k_h, v_h for every head and attend (192-dim q.k) with
`pallas_kernels.mla_attention.mla_prefill`.
absorbed form (every other forward through the cache: decode, speculative verification, later
prompt chunks): fold W_k_b into the query and W_v_b into the output,

    q_h . k_h = (q_nope_h W_k_b[:, h]^T) . c_kv + q_pe_h . k_pe
    o_h       = (sum_s p_hs c_kv_s) W_v_b[:, h]

so attention runs directly on the cache of [c_kv ; k_pe] (576 values per token per layer, not
2 x 128 heads x 128-192 per token) with `mla_attention.mla_decode` — the "absorb" mode of the
official inference code.

Parameters of one layer (`MLA`; weights [in, out], heads as their own axis; logical axes in brackets):
    wq_a [d, q_lora] (embed, q_lora)   q_norm [q_lora]   wq_b [q_lora, h, nope + rope] (q_lora, heads, head_dim)
        or, when q_lora_rank == 0,     wq [d, h, nope + rope] (embed, heads, head_dim)
    wkv_a [d, r + rope] (embed, kv_lora)   kv_norm [r]
    wk_b [r, h, nope], wv_b [r, h, v] (kv_lora, heads, head_dim)   wo [h, v, d] (heads, head_dim, embed)
Cache of one layer: {"kv": [b, max_len, r + rope]}; slot p holds the token at position p.
Paged (inference/paged_cache.py): {"kv": [num_blocks, page, r + rope], "block_table": [b, max_blocks]};
token p of row b lives at kv[block_table[b, p // page], p % page].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.models.layers import Linear, RMSNorm
from vishwam_jax.models.rope import RotaryEmbedding, yarn_mscale
from vishwam_jax.pallas_kernels.mla_attention import mla_decode, mla_prefill
from vishwam_jax.quantization import Quantization
from vishwam_jax.sharding.context import per_device


# -- configuration-derived constants ---------------------------------------------------------------
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


def rotary_embedding(config) -> RotaryEmbedding:
    """The rope of the 64-dim rope part: YaRN-stretched (128K context from a 4K pre-training length)
    with its cos/sin factor, in the checkpoint's pair layout (interleaved for the release)."""
    return RotaryEmbedding(
        config.qk_rope_head_dim,
        config.rope_theta,
        config.rope_scaling_type,
        config.rope_scaling_factor,
        interleaved=config.rope_interleaved,
        attention_factor=rope_attention_factor(config),
        original_max_len=config.rope_original_max_len,
        beta_fast=config.rope_beta_fast,
        beta_slow=config.rope_beta_slow,
    )


def latent_width(config) -> int:
    """Values per token of the latent cache: kv_lora_rank + qk_rope_head_dim (576)."""
    return config.kv_lora_rank + config.qk_rope_head_dim


def init_cache_layer(config, batch: int, max_len: int, dtype) -> dict:
    """The latent cache of one layer: kv_lora_rank + qk_rope_head_dim values per token (576)."""
    return {"kv": jnp.zeros((batch, max_len, latent_width(config)), dtype)}


# -- cache writes ----------------------------------------------------------------------------------
def write_latents(
    cache: dict, kv: Float[Array, "b t c"], positions: Int[Array, "b t"], lengths: Int[Array, " b"]
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
# (Read at trace time, so tests can move it.)
NAIVE_PREFILL_MIN_TOKENS = 64


# -- the module ------------------------------------------------------------------------------------
class MLA(nnx.Module):
    """Multi-head latent attention of one layer over the explicit latent cache (see the module docstring)."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, h, r = config.d_model, config.num_heads, config.kv_lora_rank
        nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        eps = config.norm_eps
        self.num_heads, self.kv_lora_rank, self.nope_head_dim = h, r, nope
        self.softmax_scale = float(softmax_scale(config))
        # Every projection may be quantized; W_k_b's scales are laid out for the naive form (contracting
        # the latent), and the absorbed form, which contracts its head_dim, dequantizes it instead.
        common = dict(rngs=rngs, dtype=dtype, quantization=Quantization.of(config))
        if config.q_lora_rank:
            q = config.q_lora_rank
            self.wq_a = Linear((d, q), ("embed", "q_lora"), "btd,dq->btq", fan_in=d, **common)
            self.q_norm = RMSNorm(q, eps=eps, dtype=dtype)
            self.wq_b = Linear(
                (q, h, nope + rope), ("q_lora", "heads", "head_dim"), "btq,qhk->bthk", fan_in=q, dims=(1, 2), **common
            )
            self.wq = None
        else:
            self.wq_a = self.q_norm = self.wq_b = None
            self.wq = Linear(
                (d, h, nope + rope), ("embed", "heads", "head_dim"), "btd,dhk->bthk", fan_in=d, dims=(1, 2), **common
            )
        self.wkv_a = Linear((d, r + rope), ("embed", "kv_lora"), "btd,dc->btc", fan_in=d, **common)
        self.kv_norm = RMSNorm(r, eps=eps, dtype=dtype)
        # Per head from the latent (naive form); the absorbed form applies W_k_b to the query instead.
        per_head = ("kv_lora", "heads", "head_dim")
        self.wk_b = Linear((r, h, nope), per_head, "bsc,chn->bshn", fan_in=r, dims=(1, 2), **common)
        self.wv_b = Linear((r, h, v), per_head, "bsc,chv->bshv", fan_in=r, dims=(1, 2), **common)
        self.wo = Linear(
            (h, v, d), ("heads", "head_dim", "embed"), "bthv,hvd->btd", fan_in=h * v, dims=(2, 1), **common
        )
        self.rope = rotary_embedding(config)

    # -- projections shared by both forms ----------------------------------------------------------
    def queries(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"]) -> tuple[Array, Array]:
        """q_nope [b, t, h, nope] and the rotated q_pe [b, t, h, rope]."""
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q[..., : self.nope_head_dim], q[..., self.nope_head_dim :]
        return q_nope, self.rope(q_pe, positions)

    def latents(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"]) -> Float[Array, "b t c"]:
        """What the cache holds per token: [norm(c_kv) ; rope(k_pe)] ([b, t, kv_lora_rank + rope])."""
        r = self.kv_lora_rank
        kv = self.wkv_a(x)
        c_kv = self.kv_norm(kv[..., :r])
        k_pe = self.rope(kv[..., None, r:], positions)[:, :, 0]  # one rope "head", shared by all query heads
        return jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)

    # -- the naive form ----------------------------------------------------------------------------
    def naive(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], kv: Float[Array, "b t c"] | None = None
    ) -> Float[Array, "b t d"]:
        """Causal self-attention within the chunk with per-head keys/values materialised from the
        latents `kv` (computed here if not given; the chunk starts at position 0: no cache). Right
        padding needs no mask of its own: a valid query never sees a later (padded) key."""
        r, h = self.kv_lora_rank, self.num_heads
        q_nope, q_pe = self.queries(x, positions)
        kv = self.latents(x, positions) if kv is None else kv
        c_kv, k_pe = kv[..., :r], kv[..., r:]
        k_nope = self.wk_b(c_kv)
        v = self.wv_b(c_kv)
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_pe.shape[:2] + (h, k_pe.shape[-1]))  # shared by every head
        k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
        # Per device under a mesh, like the decode kernel: XLA cannot partition the Pallas kernel, and
        # cuDNN's partitioner refuses the sequence-dim sharding GSPMD may pick when a batch of 1 does
        # not divide the batch axes.
        names = ("batch", "length", "heads", None)
        prefill = functools.partial(mla_prefill, softmax_scale=self.softmax_scale, causal=True)
        out = per_device(prefill, (q, k, v), (names, names, names), names)
        return self.wo(out)

    # -- the absorbed form over the latent cache ---------------------------------------------------
    def absorbed(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], lengths: Int[Array, " b"], cache: dict
    ) -> tuple[Float[Array, "b t d"], dict]:
        """Write the chunk's latents, then attend from W_k_b-absorbed queries over the whole latent
        cache and map the latent output through W_v_b and W_o.

        Writing before attending makes rewinding free: a chunk starting at position p overwrites the
        slots from p on before any query reads them, so slots left by rejected speculative tokens are
        never seen (a query at position p + i reads only slots <= p + i).
        """
        q_nope, q_pe = self.queries(x, positions)
        cache = write_latents(cache, self.latents(x, positions), positions, lengths)
        q_latent = self.wk_b(q_nope, "bthn,chn->bthc")
        q = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1)
        # Every chunk token counts as written for the visibility rule; padded queries' outputs are unused.
        total = positions[:, 0] + x.shape[1]
        # Per device under a mesh: the decode kernel is a Pallas call that XLA cannot partition. Batch
        # rows (and heads under tensor parallelism) are independent; a paged pool is indexed by global
        # block ids, so it stays whole and only the block table is split.
        names = ("batch", "length", "heads", None)
        decode = functools.partial(mla_decode, softmax_scale=self.softmax_scale, v_head_dim=self.kv_lora_rank)
        if "block_table" in cache:
            o_latent = per_device(
                lambda q_, kv, n, table: decode(q_, kv, n, block_table=table),
                (q, cache["kv"], total, cache["block_table"]),
                (names, None, ("batch",), ("batch", None)),
                names,
            )
        else:
            o_latent = per_device(decode, (q, cache["kv"], total), (names, ("batch", None, None), ("batch",)), names)
        out = self.wv_b(o_latent.astype(x.dtype), "bthc,chv->bthv")
        return self.wo(out), cache

    def cached(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], lengths: Int[Array, " b"], cache: dict
    ) -> tuple[Float[Array, "b t d"], dict]:
        """Attention of a chunk that continues each row's cache; the cache with the chunk's latents."""
        if x.shape[1] < NAIVE_PREFILL_MIN_TOKENS:
            return self.absorbed(x, positions, lengths, cache)

        def naive(cache):
            kv = self.latents(x, positions)
            return self.naive(x, positions, kv), write_latents(cache, kv, positions, lengths)

        def absorbed(cache):
            return self.absorbed(x, positions, lengths, cache)

        return jax.lax.cond(jnp.all(positions[:, 0] == 0), naive, absorbed, cache)

    def __call__(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], lengths: Int[Array, " b"], cache: dict | None
    ) -> tuple[Float[Array, "b t d"], dict | None]:
        """The naive form without a cache; through the latent cache with one."""
        if cache is None:
            return self.naive(x, positions), None
        return self.cached(x, positions, lengths, cache)
