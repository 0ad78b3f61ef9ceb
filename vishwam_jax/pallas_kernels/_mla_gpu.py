"""MLA decode over the latent cache: the Pallas kernel for GPUs (Triton lowering).

One program handles `block_h` query rows (rows = s_q x heads, all sharing the single latent "head")
of one batch row and one KV split, and streams that split's cache tiles once:

    scores = q[:, :dv] . tile[:, :dv]^T + q[:, dv:] . tile[:, dv:]^T     (the 512 + 64 halves)
    acc   += softmax-weights . tile[:, :dv]                               (the same tile is the value)

Triton tensors must have power-of-two sizes, so the 576-wide rows are read as a 512-wide and a
64-wide slice and contracted by two dots; the value side reuses the 512-wide slice already loaded,
so every cache byte crosses HBM once per program (and the row blocks of one batch row run side by
side in the grid's fastest axis so they share it through L2).

Splits (flash-decoding): each batch row's valid length is cut into `num_splits` equal chunks at run
time (a multiple of the tile), so short rows do not leave programs idle behind long ones; each split
writes its normalised partial output and log-sum-exp, and `combine_splits` merges them.

Softmax statistics are float32 and kept in the log2 domain (exp2 is the native instruction);
masked scores are -inf and every -inf - -inf case is guarded, so a row with no visible token gives
an all-zero output and lse = -inf rather than NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

try:  # the Triton-specific namespace (masked load/store, compiler params)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old jax
    from jax.experimental.pallas import gpu as plgpu  # type: ignore[no-redef]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PAGE = 64  # FlashMLA's page size; the kernel reads any page size that its tile divides


def _nt_dot(a, b):
    """a @ b.T with float32 accumulation (the tensor cores' native bf16 x bf16 -> f32)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn_dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _decode_kernel(
    *refs, s_q, n_heads, n_rows, dv, dr, bh, bk, page, n_splits, scale_log2, causal, paged, n_vs, reload_q
):
    if paged:
        len_ref, bt_ref, q_ref, c_ref, o_ref, lse_ref = refs
    else:
        len_ref, q_ref, c_ref, o_ref, lse_ref = refs
        bt_ref = None
    pid0, split, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # n_vs > 1: the value columns are shared out over n_vs programs (each recomputes the scores),
    # which divides the [block_h, dv] float32 accumulator, the kernel's register hog, by n_vs
    rb, vs = pid0 // n_vs, pid0 % n_vs
    dvs = dv // n_vs
    length = len_ref[b]
    r0 = rb * bh
    rows = r0 + jnp.arange(bh, dtype=jnp.int32)
    row_ok = rows < n_rows
    if causal:
        # rows are (query, head) pairs flattened query-major; query i sees lengths - s_q + i + 1 tokens
        row_end = length - s_q + rows // n_heads + 1
        last_row = jnp.minimum(r0 + bh, n_rows) - 1
        block_end = jnp.clip(length - s_q + last_row // n_heads + 1, 0, length)
    else:
        row_end = jnp.broadcast_to(length, (bh,))
        block_end = length
    chunk = pl.cdiv(pl.cdiv(block_end, n_splits), bk) * bk
    start = split * chunk
    end = jnp.minimum(block_end, start + chunk)
    n_tiles = pl.cdiv(jnp.maximum(end - start, 0), bk)

    def load_q():
        q_n = plgpu.load(q_ref.at[b, pl.ds(r0, bh), pl.ds(0, dv)], mask=row_ok[:, None], other=0)
        q_r = plgpu.load(q_ref.at[b, pl.ds(r0, bh), pl.ds(dv, dr)], mask=row_ok[:, None], other=0) if dr else None
        return q_n, q_r

    q_fixed = None if reload_q else load_q()

    def body(i, carry):
        acc, m, l = carry
        # reload_q: a loop-variant (L2-resident) q can stay a shared-memory operand instead of
        # pinning [block_h, 576] of registers for the whole loop
        q_n, q_r = load_q() if reload_q else q_fixed
        t0 = start + i * bk
        cols = t0 + jnp.arange(bk, dtype=jnp.int32)
        # the load mask also keeps stale (possibly non-finite) slots >= length out of p @ v
        col_ok = (cols < length)[:, None]
        if paged:
            blk, off = bt_ref[b, t0 // page], t0 % page
        else:
            blk, off = b, t0
        k_n = plgpu.load(c_ref.at[blk, pl.ds(off, bk), pl.ds(0, dv)], mask=col_ok, other=0)
        s = _nt_dot(q_n, k_n)
        if dr:
            k_r = plgpu.load(c_ref.at[blk, pl.ds(off, bk), pl.ds(dv, dr)], mask=col_ok, other=0)
            s = s + _nt_dot(q_r, k_r)
        s = s * scale_log2
        s = jnp.where(cols[None, :] < row_end[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if n_vs == 1:
            v = k_n
        else:
            v = plgpu.load(c_ref.at[blk, pl.ds(off, bk), pl.ds(vs * dvs, dvs)], mask=col_ok, other=0)
        acc = acc * alpha[:, None] + _nn_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    acc = jnp.zeros((bh, dvs), jnp.float32)
    m = jnp.full((bh,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bh,), jnp.float32)
    acc, m, l = jax.lax.fori_loop(0, n_tiles, body, (acc, m, l))

    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
    plgpu.store(o_ref.at[b, split, pl.ds(r0, bh), pl.ds(vs * dvs, dvs)], out.astype(o_ref.dtype), mask=row_ok[:, None])
    plgpu.store(lse_ref.at[b, split, pl.ds(r0, bh)], lse, mask=row_ok)


def combine_splits(
    o: Float[Array, "b n r v"], lse: Float[Array, "b n r"]
) -> tuple[Float[Array, "b r v"], Float[Array, "b r"]]:
    """Merge per-split normalised outputs by their log-sum-exp (empty splits carry lse = -inf)."""
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)  # [b, n, r]; exactly 0 for empty splits
    den = jnp.sum(w, axis=1)
    # a broadcast multiply + reduction (one fused XLA loop), not an einsum: as a dot this would be a
    # [1 x n] @ [n x v] GEMM per (b, r), which cuBLAS runs far below bandwidth
    out = jnp.sum(w[..., None] * o.astype(jnp.float32), axis=1) / jnp.where(den == 0, 1.0, den)[..., None]
    return out, jnp.where(den == 0, -jnp.inf, top[:, 0] + jnp.log(jnp.where(den == 0, 1.0, den)))


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132)


# split-KV heuristic: below FULL_WAVE x SMs programs, split each row into enough chunks for about
# SPLIT_WAVES waves (rounded down so a wave is not left with a few stragglers), no chunk shorter
# than MIN_SPLIT_WIDE / MIN_SPLIT_NARROW tokens. Wide row blocks (64 query rows x 576) are compute-
# heavy per token, so even one 64-token tile per program pays for its partial output; narrow ones
# (<= 32 rows) are bandwidth-bound and want longer chunks. (H100 sweep: docs/bench_mla.md.)
FULL_WAVE, SPLIT_WAVES, MIN_SPLIT_WIDE, MIN_SPLIT_NARROW = 0.75, 1, 64, 256


# Tile configs (H100-tuned, docs/bench_mla.md): WIDE when there are more than 32 query rows
# (s_q x heads) per batch row, else NARROW with block_h = rows rounded up to a power of two (>= 16).
# block_k 32 for NARROW: three stages of 64 x 576 bf16 tiles would not fit in shared memory.
CFG_WIDE = dict(block_h=64, block_k=64, num_warps=8, num_stages=2, reload_q=True)
CFG_NARROW = dict(block_k=32, num_warps=4, num_stages=3)


def default_config(n_rows: int, batch: int, max_len: int, paged: bool) -> dict:
    del paged
    wide = n_rows > 32
    if wide:
        cfg = dict(CFG_WIDE)
    else:
        cfg = dict(CFG_NARROW, block_h=max(16, 1 << (max(n_rows, 1) - 1).bit_length()))
    programs = batch * pl.cdiv(n_rows, cfg["block_h"]) * cfg.get("v_splits", 1)
    sms = num_sms()
    splits = 1
    if programs < FULL_WAVE * sms:
        min_split = MIN_SPLIT_WIDE if wide else MIN_SPLIT_NARROW
        splits = max(1, min(int(SPLIT_WAVES * sms) // programs, max_len // min_split))
    cfg["num_splits"] = splits
    return cfg


@functools.partial(
    jax.jit,
    static_argnames=(
        "softmax_scale",
        "v_head_dim",
        "causal",
        "num_splits",
        "block_h",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
        "out_dtype",
        "v_splits",
        "reload_q",
        "partial_dtype",
    ),
)
def mla_decode_gpu(
    q: Float[Array, "b s_q h d"],
    cache: Float[Array, "b L d"] | Float[Array, "nb page d"],
    lengths: Int[Array, " b"],
    block_table: Int[Array, "b mb"] | None = None,
    *,
    softmax_scale: float,
    v_head_dim: int = 512,
    causal: bool = True,
    num_splits: int = 1,
    block_h: int = 64,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
    interpret: bool = False,
    out_dtype=None,
    v_splits: int = 1,
    reload_q: bool = False,
    partial_dtype=None,
) -> tuple[Float[Array, "b s_q h v"], Float[Array, "b s_q h"]]:
    batch, s_q, n_heads, d = q.shape
    dv, dr = v_head_dim, d - v_head_dim
    for name, size in (("v_head_dim", dv), ("rope part", dr)):
        if size and (size & (size - 1) or size < 16):
            raise ValueError(f"the Triton kernel needs {name} to be 0 or a power of two >= 16, got {size}")
    if cache.shape[-1] != d:
        raise ValueError(f"q has {d} channels per head but the cache {cache.shape[-1]}")
    paged = block_table is not None
    page = cache.shape[1] if paged else 0
    if paged and page % block_k:
        raise ValueError(f"block_k={block_k} must divide the page size {page}")
    n_rows = s_q * n_heads
    q2 = q.reshape(batch, n_rows, d)  # free: (s_q, h) are adjacent and contiguous
    cache = cache.astype(q.dtype)
    n_rb = pl.cdiv(n_rows, block_h)
    # Split partials are normalised outputs (|o| <= max |v|) stored in the input dtype unless
    # partial_dtype says otherwise: bf16 halves the combine's traffic, which at 128 heads and small
    # batches is a large share of the run time, at the cost of one extra bf16 rounding.
    partial_dtype = (out_dtype or q.dtype) if num_splits == 1 else (partial_dtype or q.dtype)
    kernel = functools.partial(
        _decode_kernel,
        s_q=s_q,
        n_heads=n_heads,
        n_rows=n_rows,
        dv=dv,
        dr=dr,
        bh=block_h,
        bk=block_k,
        page=page,
        n_splits=num_splits,
        scale_log2=float(softmax_scale) * LOG2E,
        causal=causal,
        paged=paged,
        n_vs=v_splits,
        reload_q=reload_q,
    )
    args = (lengths.astype(jnp.int32),) + ((block_table.astype(jnp.int32),) if paged else ()) + (q2, cache)
    o, lse = pl.pallas_call(
        kernel,
        grid=(n_rb * v_splits, num_splits, batch),
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_splits, n_rows, dv), partial_dtype),
            jax.ShapeDtypeStruct((batch, num_splits, n_rows), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_decode",
    )(*args)
    if num_splits == 1:
        o, lse = o[:, 0], lse[:, 0]
    else:
        o, lse = combine_splits(o, lse)
    return o.astype(out_dtype or q.dtype).reshape(batch, s_q, n_heads, dv), lse.reshape(batch, s_q, n_heads)
