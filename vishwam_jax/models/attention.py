"""Grouped-query attention over an explicit KV cache (shared by Gemma and Grok-1).

The cache of one layer is a dict of arrays (stacked with a leading layer axis across a scanned stack):
    k, v      [b, slots, kv_heads, head_dim]
    slot_pos  [b, slots] int32: the absolute position held by each slot, -1 when empty or masked.
Full-attention layers have one slot per position (slots = max length); sliding-window layers keep a
ring buffer of `window` slots (position p lives in slot p % window). Recording the position of every
slot makes one mask rule serve both, as well as per-row prompt lengths and masked (pad) keys.

Paged (inference/paged_cache.py; full-attention layers): the same three arrays as page pools
    k, v [num_blocks, page, kv_heads, head_dim], slot_pos [num_blocks, page], block_table [b, max_blocks];
token p of row b lives at k[block_table[b, p // page], p % page]. As in MLA's paged form the chunk is
written first and the row's pages are then read back as one contiguous view (slot s = position s).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.models.layers import Linear, RMSNorm, soft_cap
from vishwam_jax.models.rope import RotaryEmbedding
from vishwam_jax.pallas_kernels.paged_attention import gpu_kernel_fits, paged_decode_gpu
from vishwam_jax.quantization import Quantization
from vishwam_jax.sharding import context as sharding_context
from vishwam_jax.sharding.context import constrain

_log = logging.getLogger(__name__)

# Finite so that a query with no visible key (a padding row) gives uniform weights, not NaN.
MASK_VALUE = -1e30


def init_kv_cache_layer(
    batch: int, slots: int, kv_heads: int, head_dim: int, dtype, v_head_dim: int | None = None
) -> dict:
    v_head_dim = v_head_dim or head_dim
    return {
        "k": jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
        "v": jnp.zeros((batch, slots, kv_heads, v_head_dim), dtype),
        "slot_pos": jnp.full((batch, slots), -1, jnp.int32),
    }


def init_paged_kv_layer(num_blocks: int, kv_heads: int, head_dim: int, dtype, v_head_dim: int | None = None) -> dict:
    """One full-attention layer's K/V in page pools (a slot's position -1: empty)."""
    return {
        "k": paged_cache.init_pool(num_blocks, (kv_heads, head_dim), dtype),
        "v": paged_cache.init_pool(num_blocks, (kv_heads, v_head_dim or head_dim), dtype),
        "slot_pos": paged_cache.init_pool(num_blocks, (), jnp.int32, fill=-1),
    }


def visible(q_pos: Int[Array, "b t"], k_pos: Int[Array, "b s"], window: int) -> Bool[Array, "b t s"]:
    """Causal (and sliding-window) visibility; keys at position -1 are never visible."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window:
        ok &= q - k < window
    return ok


def write_kv(
    cache: dict,
    k: Array,
    v: Array,
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key_valid: Bool[Array, "b t"],
) -> dict:
    """Store the chunk's keys/values at their positions' slots; tokens past `lengths` are not stored."""
    batch, slots = cache["slot_pos"].shape
    t = k.shape[1]
    in_row = jnp.arange(t)[None, :] < lengths[:, None]
    key_pos = jnp.where(in_row & key_valid, positions, -1)
    if t <= slots:
        # Distinct positions map to distinct slots, so a scatter is deterministic; rejected tokens are
        # sent out of range and dropped so that they cannot overwrite a live slot of a ring buffer.
        slot = jnp.where(in_row, positions % slots, slots)
        rows = jnp.arange(batch)[:, None]
        return {
            "k": cache["k"].at[rows, slot].set(k.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[rows, slot].set(v.astype(cache["v"].dtype), mode="drop"),
            "slot_pos": cache["slot_pos"].at[rows, slot].set(key_pos, mode="drop"),
        }
    # A chunk longer than the ring (a long prompt into a sliding-window layer): slot s takes the
    # latest token of the row whose position is congruent to s.
    start = positions[:, 0]
    end = start + lengths
    s = jnp.arange(slots)[None, :]
    latest = s + slots * jnp.floor_divide(end[:, None] - 1 - s, slots)
    take = latest >= start[:, None]
    idx = jnp.clip(latest - start[:, None], 0, t - 1)
    pick = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
    new_pos = jnp.take_along_axis(key_pos, idx, axis=1)
    return {
        "k": jnp.where(take[:, :, None, None], pick(k).astype(cache["k"].dtype), cache["k"]),
        "v": jnp.where(take[:, :, None, None], pick(v).astype(cache["v"].dtype), cache["v"]),
        "slot_pos": jnp.where(take, new_pos, cache["slot_pos"]),
    }


# Queries per score block. A whole [t, t] float32 block is 13 GB per layer for Grok-1's 48 heads at 8K;
# blocks of 1024 queries bound it to b·h·1024·s while leaving short prompts and decoding untouched.
QUERY_BLOCK = 1024


def attend_segments(
    q: Float[Array, "b t h d"],
    segments: list[tuple[Array, Array, Array]],
    *,
    scale: float,
    softcap: float = 0.0,
    query_block: int | None = None,
) -> Float[Array, "b t h dv"]:
    """Softmax attention over several key/value segments (e.g. the cache and the new chunk) with
    grouped KV heads, float32 scores and optional tanh soft-capping.

    Each segment is (k [b, s, kv_heads, d], v [b, s, kv_heads, dv], visible [b, t, s]). Scores are
    concatenated rather than keys, so a large cache is read in place and never copied. More than
    `query_block` queries are processed a block at a time (each block rematerialized in the backward
    pass), so neither the forward nor the gradient holds all t × s scores at once.
    """
    b, t, h, _ = q.shape
    query_block = query_block or QUERY_BLOCK
    if t <= query_block:
        return _attend_block(q, segments, scale, softcap)
    n = -(-t // query_block)
    pad = n * query_block - t
    # Padded query rows see no key: finite uniform weights, sliced off below.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    masks = [jnp.pad(m, ((0, 0), (0, pad), (0, 0))) for _, _, m in segments]

    @jax.checkpoint
    def block(i):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, i * query_block, query_block, axis=1)
        return _attend_block(rows(q), [(k, v, rows(m)) for (k, v, _), m in zip(segments, masks)], scale, softcap)

    out = jax.lax.map(block, jnp.arange(n))  # [n, b, query_block, h, dv]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * query_block, h, -1)[:, :t]


def _attend_block(q: Float[Array, "b t h d"], segments: list, scale: float, softcap: float) -> Float[Array, "b t h dv"]:
    b, t, h, d = q.shape
    kh = segments[0][0].shape[2]
    qg = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.concatenate(
        [
            jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
            for k, _, _ in segments
        ],
        axis=-1,
    )
    mask = jnp.concatenate([m for _, _, m in segments], axis=-1)
    scores = soft_cap(scores * scale, softcap)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out, offset = 0.0, 0
    for k, v, _ in segments:
        p = probs[..., offset : offset + k.shape[1]].astype(q.dtype)
        out = out + jnp.einsum("bkgts,bskd->btkgd", p, v.astype(q.dtype))
        offset += k.shape[1]
    return out.reshape(b, t, h, -1)


def write_kv_pages(
    cache: dict,
    k: Float[Array, "b t kh d"],
    v: Float[Array, "b t kh dv"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key_valid: Bool[Array, "b t"],
) -> dict:
    """Store the chunk's keys/values and positions in the row's pages (tokens past `lengths` are
    dropped by the page write; masked keys are recorded at position -1)."""
    table = cache["block_table"]
    write = lambda pool, values: paged_cache.write_tokens(pool, table, values, positions, lengths)  # noqa: E731
    key_pos = jnp.where(key_valid, positions, -1)
    return {
        **cache,
        "k": write(cache["k"], k),
        "v": write(cache["v"], v),
        "slot_pos": write(cache["slot_pos"], key_pos),
    }


def read_kv_pages(
    cache: dict, end: Int[Array, " b"]
) -> tuple[Float[Array, "b s kh d"], Float[Array, "b s kh dv"], Int[Array, "b s"]]:
    """Each row's pages as contiguous keys, values and key positions (slot s holds position s), of
    which only the slots below `end` (the row's length once its chunk is written) that hold their
    own position's key count; the others read as position -1 and zero values.

    A page keeps whatever its previous owner wrote until the new owner overwrites it: the slots
    below a row's length were all written by the row itself, those above may hold anything. Their
    values are zeroed as well as masked, since a stale NaN would otherwise reach the output through
    its zero attention weight (0 x NaN): one request's failure corrupting the next owner of its pages.
    """
    table = cache["block_table"]
    slot_pos = paged_cache.gather_tokens(cache["slot_pos"], table)
    slots = jnp.arange(slot_pos.shape[1], dtype=slot_pos.dtype)[None, :]
    counts = (slot_pos == slots) & (slots < end[:, None])
    values = paged_cache.gather_tokens(cache["v"], table)
    values = jnp.where(counts[:, :, None, None], values, jnp.zeros((), values.dtype))
    return paged_cache.gather_tokens(cache["k"], table), values, jnp.where(counts, slot_pos, -1)


# Decode steps over a paged cache use the Triton kernel on GPUs ("off", or VISHWAM_PAGED_DECODE=off: the
# XLA gather path; "interpret": the kernel in Pallas' interpreter on any backend, for tests).
PAGED_DECODE_KERNEL = os.environ.get("VISHWAM_PAGED_DECODE", "auto")


def paged_decode_kernel_applies(q: Array, cache: dict) -> bool:
    if os.environ.get(ENV_VAR, "auto") == "xla" or PAGED_DECODE_KERNEL == "off":
        return False
    if sharding_context.current() is not None and not sharding_context.inside_manual_region():
        # Under a mesh XLA cannot partition the Pallas call, and running it per device needs query and
        # KV heads split alike (not so when there are fewer KV heads than tensor shards): the XLA path.
        return False
    if not gpu_kernel_fits(q, cache["k"], cache["v"]):
        return False
    return PAGED_DECODE_KERNEL == "interpret" or jax.default_backend() == "gpu"


def paged_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t kh d"],
    v: Float[Array, "b t kh dv"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key_valid: Bool[Array, "b t"],
    cache: dict,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> tuple[Float[Array, "b t h dv"], dict]:
    """Write the chunk into the row's pages, then attend over the pages (as MLA's paged form does).

    Writing before attending makes rewinding free: a chunk starting at position p overwrites the
    slots from p on before any query reads them, so slots left by rejected speculative tokens are
    never seen. Only full-attention layers page (a window is still honoured by the mask).
    """
    cache = write_kv_pages(cache, k, v, positions, lengths, key_valid)
    if q.shape[1] == 1 and paged_decode_kernel_applies(q, cache):
        ends = positions[:, 0] + lengths
        out = paged_decode_gpu(
            q[:, 0], cache["k"], cache["v"], cache["slot_pos"], cache["block_table"], ends,
            scale=scale, softcap=softcap, window=window, interpret=jax.default_backend() != "gpu",
        )  # fmt: skip
        return out[:, None], cache
    keys, values, key_pos = read_kv_pages(cache, positions[:, 0] + lengths)
    out = attend_segments(q, [(keys, values, visible(positions, key_pos, window))], scale=scale, softcap=softcap)
    return out, cache


# Chunks at least this long that start their rows (every prompt's first chunk, training) go through
# cuDNN's fused flash attention where it applies; shorter ones are not worth the branch.
FUSED_MIN_TOKENS = 64
# `jax.nn.dot_product_attention`'s implementation for that path; tests run the same call with "xla"
# on a CPU in place of cuDNN.
FUSED_IMPLEMENTATION = "cudnn"


# "xla" keeps every attention on the XLA path (the escape hatch if cuDNN misbehaves on some setup).
ENV_VAR = "VISHWAM_ATTENTION_IMPL"


def fused_attention_applies(q: Array, softcap: float) -> bool:
    """Whether cuDNN's fused attention (through `jax.nn.dot_product_attention`) can compute this
    attention: on a GPU, half-precision queries, a head dim that is a multiple of 8 up to 256, and
    no soft-capping (Gemma 2's logit cap is not among its options: those layers keep the XLA path)."""
    return (
        os.environ.get(ENV_VAR, "auto") != "xla"
        and softcap == 0.0
        and jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def fused_causal_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t kh d"],
    v: Float[Array, "b t kh d"],
    lengths: Int[Array, " b"],
    *,
    scale: float,
    window: int = 0,
) -> Float[Array, "b t h d"]:
    """Causal self-attention of a chunk that starts each row at position 0, whose keys are valid below
    each row's length, by cuDNN's flash kernel (no [t, t] scores in memory); a sliding window keeps
    the `window` latest positions. Queries past a row's length come out zero."""
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=(window - 1, 0) if window else None, implementation=FUSED_IMPLEMENTATION,
    )  # fmt: skip


def cached_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t kh d"],
    v: Float[Array, "b t kh dv"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key_valid: Bool[Array, "b t"],
    cache: dict | None,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    prefix_keys: bool = False,
) -> tuple[Float[Array, "b t h dv"], dict | None]:
    """Attend from the chunk's queries to the cached keys and the chunk's own keys, then store the
    chunk in the cache (attending before writing keeps a ring buffer right for multi-token chunks).
    A paged cache (one with a block table) goes through `paged_attention`.

    prefix_keys: the caller masks no key inside a row (every key below a row's length is valid), so
    a long chunk that starts its rows can run cuDNN's fused kernel (`fused_causal_attention`) where it
    applies: always without a cache, and with one when every row of the chunk starts at position 0
    (decided on the device: the cache then holds nothing the chunk could see).
    """
    t = q.shape[1]
    if (
        prefix_keys
        and t >= FUSED_MIN_TOKENS
        and fused_attention_applies(q, softcap)
        and _cudnn_accepts(q, k, v, lengths, window)
    ):
        return _fused_where_fresh(q, k, v, positions, lengths, key_valid, cache, scale=scale, window=window)
    return _chunk_attention(q, k, v, positions, lengths, key_valid, cache, scale=scale, softcap=softcap, window=window)


def _cudnn_accepts(q, k, v, lengths, window: int) -> bool:
    """Whether cuDNN's own checks (run when the call is traced: version, head dim, layout, window)
    accept this layer; a layer they refuse runs on the XLA path, and says so."""
    try:
        jax.eval_shape(lambda *a: fused_causal_attention(*a, scale=1.0, window=window), q, k, v, lengths)
    except (NotImplementedError, ValueError, RuntimeError) as err:
        _log.warning("cuDNN fused attention refused this layer (%s); it runs on the XLA path", err)
        return False
    return True


def _fused_where_fresh(q, k, v, positions, lengths, key_valid, cache, *, scale, window):
    """The fused kernel without a cache; with one, a cond between it (every row starts at 0) and the
    XLA path."""
    fused = lambda: fused_causal_attention(q, k, v, lengths, scale=scale, window=window)  # noqa: E731
    if cache is None:
        return fused(), None
    write = write_kv_pages if "block_table" in cache else write_kv

    def fresh(cache):
        return fused().astype(q.dtype), write(cache, k, v, positions, lengths, key_valid)

    def general(cache):
        out, cache = _chunk_attention(q, k, v, positions, lengths, key_valid, cache, scale=scale, window=window)
        return out.astype(q.dtype), cache

    return jax.lax.cond(jnp.all(positions[:, 0] == 0), fresh, general, cache)


def _chunk_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t kh d"],
    v: Float[Array, "b t kh dv"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
    key_valid: Bool[Array, "b t"],
    cache: dict | None,
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> tuple[Float[Array, "b t h dv"], dict | None]:
    """`cached_attention` by XLA: scores over the cache and the chunk (or the row's pages)."""
    if cache is not None and "block_table" in cache:
        return paged_attention(
            q, k, v, positions, lengths, key_valid, cache, scale=scale, softcap=softcap, window=window
        )
    t = q.shape[1]
    if cache is not None and t == 1:
        # One decoded token: store it, then attend over the cache alone. One score segment keeps
        # XLA:GPU from building the new key's score in a separate slow fusion (a tenth of the
        # per-layer time at batch 1); the slot it takes in a ring held a key outside the window.
        cache = write_kv(cache, k, v, positions, lengths, key_valid)
        segments = [(cache["k"], cache["v"], visible(positions, cache["slot_pos"], window))]
        return attend_segments(q, segments, scale=scale, softcap=softcap), cache
    in_row = jnp.arange(t)[None, :] < lengths[:, None]
    new_pos = jnp.where(in_row & key_valid, positions, -1)
    segments = [(k, v, visible(positions, new_pos, window))]
    if cache is not None:
        # Slots at or past the chunk's first position are stale (e.g. rejected speculative tokens).
        old_pos = jnp.where(cache["slot_pos"] < positions[:, :1], cache["slot_pos"], -1)
        segments.insert(0, (cache["k"], cache["v"], visible(positions, old_pos, window)))
    out = attend_segments(q, segments, scale=scale, softcap=softcap)
    if cache is not None:
        cache = write_kv(cache, k, v, positions, lengths, key_valid)
    return out, cache


class Attention(nnx.Module):
    """Grouped-query self-attention over the explicit cache: project, (QK-norm), rotate, attend, project out.

    Weights: q [d, h, hd], k/v [d, kh, hd], o [h, hd, d]; q_norm/k_norm [hd] when QK-norm is used.
    """

    def __init__(
        self,
        d: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope: RotaryEmbedding,
        scale: float,
        softcap: float = 0.0,
        window: int = 0,
        qk_norm_eps: float | None = None,
        qk_norm_plus_one: bool = True,
        prefix_keys: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        quantization: Quantization | None = None,
    ):
        h, kh, hd = num_heads, num_kv_heads, head_dim
        common = dict(rngs=rngs, dtype=dtype, quantization=quantization)
        self.q = Linear((d, h, hd), ("embed", "heads", "head_dim"), "btd,dhk->bthk", fan_in=d, dims=(1, 2), **common)
        self.k = Linear(
            (d, kh, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk", fan_in=d, dims=(1, 2), **common
        )
        self.v = Linear(
            (d, kh, hd), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk", fan_in=d, dims=(1, 2), **common
        )
        self.o = Linear(
            (h, hd, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd", fan_in=h * hd, dims=(2, 1), **common
        )
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(hd, eps=qk_norm_eps, plus_one=qk_norm_plus_one, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=qk_norm_eps, plus_one=qk_norm_plus_one, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope
        self.scale, self.softcap, self.window = float(scale), float(softcap), int(window)
        # The family masks no key inside a row (see cached_attention): long chunks may use cuDNN's kernel.
        self.prefix_keys = bool(prefix_keys)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        positions: Int[Array, "b t"],
        lengths: Int[Array, " b"],
        key_valid: Bool[Array, "b t"],
        cache: dict | None,
    ) -> tuple[Float[Array, "b t d"], dict | None]:
        # Heads over tensor (Megatron): attention is then local to each shard until the out projection.
        q = constrain(self.q(x), ("batch", "length", "heads", "head_dim"))
        k = constrain(self.k(x), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(self.v(x), ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        out, cache = cached_attention(
            q, k, v, positions, lengths, key_valid, cache, scale=self.scale, softcap=self.softcap, window=self.window,
            prefix_keys=self.prefix_keys,
        )  # fmt: skip
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return constrain(self.o(out), ("batch", "length", "embed")), cache
