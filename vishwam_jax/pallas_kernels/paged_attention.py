"""Decode attention over a paged K/V cache with grouped KV heads (Gemma's global layers, Grok-1).

    out = paged_decode(q, k_pool, v_pool, slot_pos, block_table, ends, scale=..., softcap=..., window=...)

One query token per row attends over the row's pages where they lie in the pool, instead of first
gathering them into a contiguous copy (which writes the whole cache once more and reads it twice
per layer and step). The visibility rule is the cache's own (models/attention.py): slot s of a row
is a key iff the position recorded there is s and s < the row's end, and the query (at end - 1)
sees it causally and within the window. Slots that fail it are loaded as zeros, so a stale
non-finite value left in a page by its previous owner never reaches the output.

`paged_decode_reference` is the pure-jnp form (gather, mask, softmax), the kernel's test oracle;
`paged_decode_gpu` is the Triton kernel (flash-decoding: each row's pages are split across programs
when rows x KV heads are too few to fill the GPU, and the partial outputs merged by log-sum-exp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels._mla_gpu import LN2, LOG2E, _nn_dot, _nt_dot, combine_splits, num_sms

try:  # the Triton-specific namespace (masked load/store, compiler params)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old jax
    from jax.experimental.pallas import gpu as plgpu  # type: ignore[no-redef]


def _visible(slot_pos, cols, ends, window: int):
    """Key visibility of slots `cols` holding positions `slot_pos`, for a query at ends - 1."""
    ok = (slot_pos == cols) & (cols < ends)
    if window:
        ok &= ends - 1 - cols < window
    return ok


def paged_decode_reference(
    q: Float[Array, "b h d"],
    k_pool: Float[Array, "nb page kh d"],
    v_pool: Float[Array, "nb page kh dv"],
    slot_pos: Int[Array, "nb page"],
    block_table: Int[Array, "b mb"],
    ends: Int[Array, " b"],
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
) -> Float[Array, "b h dv"]:
    nb, page, kh, _ = k_pool.shape
    b, h, d = q.shape
    table = jnp.clip(block_table, 0, nb - 1)
    length = table.shape[1] * page
    keys = k_pool[table].reshape(b, length, kh, d)
    pos = slot_pos[table].reshape(b, length)
    cols = jnp.arange(length, dtype=jnp.int32)[None, :]
    ok = _visible(pos, cols, ends[:, None], window)  # [b, L]
    values = jnp.where(ok[:, :, None, None], v_pool[table].reshape(b, length, kh, -1), 0)
    qg = q.reshape(b, kh, h // kh, d).astype(jnp.float32)
    scores = jnp.einsum("bgrd,bsgd->bgrs", qg, keys.astype(jnp.float32)) * scale
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(ok[:, None, None, :], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0, 1.0, total)  # a row with no key: zeros
    out = jnp.einsum("bgrs,bsgv->bgrv", weights, values.astype(jnp.float32))
    return out.reshape(b, h, -1).astype(q.dtype)


def _decode_kernel(
    ends_ref, bt_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref, *, group, bh, bk, page, n_splits, scale, softcap,
    window,
):  # fmt: skip
    """One program: the `group` query heads of one KV head, one row, one split of its pages."""
    g, split, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    end = ends_ref[b]
    rows = jnp.arange(bh, dtype=jnp.int32)
    row_ok = rows < group
    chunk = pl.cdiv(pl.cdiv(end, n_splits), bk) * bk
    start = split * chunk
    stop = jnp.minimum(end, start + chunk)
    n_tiles = pl.cdiv(jnp.maximum(stop - start, 0), bk)
    q = plgpu.load(q_ref.at[b, pl.ds(g * group, bh), :], mask=row_ok[:, None], other=0)

    def body(i, carry):
        acc, m, l = carry
        t0 = start + i * bk
        cols = t0 + jnp.arange(bk, dtype=jnp.int32)
        blk, off = bt_ref[b, t0 // page], t0 % page
        pos = plgpu.load(pos_ref.at[blk, pl.ds(off, bk)], mask=cols < end, other=-1)
        ok = _visible(pos, cols, end, window)
        k = plgpu.load(k_ref.at[blk, pl.ds(off, bk), g, :], mask=ok[:, None], other=0)
        s = _nt_dot(q, k) * scale
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        s = jnp.where(ok[None, :], s * LOG2E, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = plgpu.load(v_ref.at[blk, pl.ds(off, bk), g, :], mask=ok[:, None], other=0)
        acc = acc * alpha[:, None] + _nn_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    dv = o_ref.shape[-1]
    acc = jnp.zeros((bh, dv), jnp.float32)
    m = jnp.full((bh,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bh,), jnp.float32)
    acc, m, l = jax.lax.fori_loop(0, n_tiles, body, (acc, m, l))
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
    plgpu.store(
        o_ref.at[b, split, pl.ds(g * group, bh), :], (acc / l_safe[:, None]).astype(o_ref.dtype), mask=row_ok[:, None]
    )
    plgpu.store(lse_ref.at[b, split, pl.ds(g * group, bh)], lse, mask=row_ok)


def default_splits(batch: int, kv_heads: int, max_len: int, min_split: int = 256) -> int:
    """Flash-decoding splits: enough programs for about one wave of the GPU's SMs."""
    programs = batch * kv_heads
    if programs >= 0.75 * num_sms():
        return 1
    return max(1, min(num_sms() // programs, max_len // min_split))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "softcap", "window", "num_splits", "block_k", "num_warps", "num_stages", "interpret"),
)
def paged_decode_gpu(
    q: Float[Array, "b h d"],
    k_pool: Float[Array, "nb page kh d"],
    v_pool: Float[Array, "nb page kh dv"],
    slot_pos: Int[Array, "nb page"],
    block_table: Int[Array, "b mb"],
    ends: Int[Array, " b"],
    *,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    num_splits: int | None = None,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "b h dv"]:
    b, h, d = q.shape
    nb, page, kh, dv = v_pool.shape
    for name, size in (("head_dim", d), ("v_head_dim", dv)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"the Triton kernel needs {name} to be a power of two >= 16, got {size}")
    if page % block_k:
        raise ValueError(f"block_k={block_k} must divide the page size {page}")
    group = h // kh
    bh = max(16, 1 << (group - 1).bit_length())  # tensor-core dots need >= 16 rows
    splits = num_splits or default_splits(b, kh, block_table.shape[1] * page)
    # Ids past a row's pages are clipped into the pool: those slots fail the visibility rule anyway.
    table = jnp.clip(block_table, 0, nb - 1).astype(jnp.int32)
    kernel = functools.partial(
        _decode_kernel, group=group, bh=bh, bk=block_k, page=page, n_splits=splits, scale=float(scale),
        softcap=float(softcap), window=int(window),
    )  # fmt: skip
    o, lse = pl.pallas_call(
        kernel,
        grid=(kh, splits, b),
        out_shape=(
            jax.ShapeDtypeStruct((b, splits, h, dv), k_pool.dtype),
            jax.ShapeDtypeStruct((b, splits, h), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_gqa_decode",
    )(ends.astype(jnp.int32), table, q.astype(k_pool.dtype), k_pool, v_pool.astype(k_pool.dtype), slot_pos)
    if splits == 1:
        return o[:, 0].astype(q.dtype)
    out, _ = combine_splits(o, lse)
    return out.astype(q.dtype)


def gpu_kernel_fits(q: Array, k_pool: Array, v_pool: Array, block_k: int = 64) -> bool:
    """Whether the Triton kernel takes these shapes: power-of-two head dims of at least 16 (Triton's
    tensor sizes) and pages that its key tile divides."""
    dims = (q.shape[-1], v_pool.shape[-1])
    return all(n >= 16 and not n & (n - 1) for n in dims) and k_pool.shape[1] % block_k == 0
