"""MLA decode over the latent cache: the Pallas kernel for TPUs (Mosaic).

Grid (batch, split, kv block); the kv-block axis is the sequential ("arbitrary") one and carries
the online-softmax state in VMEM scratch. Lengths and the block table are scalar-prefetched into
SMEM so that the cache BlockSpec's index map can follow the page table and, past a row's last
valid block, keep returning that block: Pallas skips the DMA when consecutive block indices are
equal, so short rows cost no HBM traffic for the padding of the grid.

All query rows of a batch row (s_q x heads, which share the single latent head) form one [R, 576]
tile: the MXU sees an [R, 576] x [576, bk] and an [R, bk] x [bk, 512] product per block.
Splits are static here (split s owns blocks [s * per_split, (s + 1) * per_split)); the combine is
`_mla_gpu.combine_splits`.

Not measured on a TPU (none was available); correctness is tested in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels._mla_gpu import combine_splits


def _tpu_kernel(len_ref, *refs, s_q, n_heads, dv, bk, per_split, scale, causal, paged):
    if paged:
        _bt_ref, q_ref, k_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    n_rows = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    t0 = (split * per_split + j) * bk

    @pl.when(t0 < length)
    def _step():
        q = q_ref[...]
        k = k_ref[...]
        col = t0 + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        # slots past the row's length (a partial last block, a stale page) may hold anything
        kv = jnp.where(col < length, k, jnp.zeros_like(k))
        dims = (((1,), (1,)), ((), ()))
        s = jax.lax.dot_general(q[:, :dv], kv[:, :dv], dims, preferred_element_type=jnp.float32)
        if q.shape[1] > dv:
            s = s + jax.lax.dot_general(q[:, dv:], kv[:, dv:], dims, preferred_element_type=jnp.float32)
        s = s * scale
        cols = t0 + jax.lax.broadcasted_iota(jnp.int32, (n_rows, bk), 1)
        if causal:
            rows = jax.lax.broadcasted_iota(jnp.int32, (n_rows, bk), 0)
            limit = length - s_q + rows // n_heads + 1
        else:
            limit = length
        s = jnp.where(cols < limit, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(kv.dtype), kv[:, :dv], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        acc_sc[...] = acc_sc[...] * alpha + pv
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


@functools.partial(
    jax.jit, static_argnames=("softmax_scale", "v_head_dim", "causal", "num_splits", "block_k", "interpret")
)
def mla_decode_tpu(
    q: Float[Array, "b s_q h d"],
    cache: Float[Array, "b L d"] | Float[Array, "nb page d"],
    lengths: Int[Array, " b"],
    block_table: Int[Array, "b mb"] | None = None,
    *,
    softmax_scale: float,
    v_head_dim: int = 512,
    causal: bool = True,
    num_splits: int = 1,
    block_k: int = 512,
    interpret: bool = False,
) -> tuple[Float[Array, "b s_q h v"], Float[Array, "b s_q h"]]:
    batch, s_q, n_heads, d = q.shape
    dv = v_head_dim
    n_rows = s_q * n_heads
    paged = block_table is not None
    cache = cache.astype(q.dtype)
    if paged:
        bk = cache.shape[1]
        n_blocks = block_table.shape[1]
    else:
        bk = min(block_k, cache.shape[1])
        n_blocks = pl.cdiv(cache.shape[1], bk)
    per_split = pl.cdiv(n_blocks, num_splits)
    lengths = lengths.astype(jnp.int32)

    def kv_block(b, s, j, len_ref, *bt):
        last = jnp.maximum(pl.cdiv(len_ref[b], bk) - 1, 0)
        blk = jnp.minimum(jnp.minimum(s * per_split + j, last), n_blocks - 1)
        if paged:
            return bt[0][b, blk], 0, 0
        return b, blk, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2 if paged else 1,
        grid=(batch, num_splits, per_split),
        in_specs=[
            pl.BlockSpec((None, n_rows, d), lambda b, s, j, *_: (b, 0, 0)),
            pl.BlockSpec((None, bk, d), kv_block),
        ],
        out_specs=[
            pl.BlockSpec((None, None, n_rows, dv), lambda b, s, j, *_: (b, s, 0, 0)),
            pl.BlockSpec((None, None, n_rows, 1), lambda b, s, j, *_: (b, s, 0, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((n_rows, 1), jnp.float32),
            pltpu.VMEM((n_rows, 1), jnp.float32),
            pltpu.VMEM((n_rows, dv), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _tpu_kernel,
        s_q=s_q,
        n_heads=n_heads,
        dv=dv,
        bk=bk,
        per_split=per_split,
        scale=float(softmax_scale),
        causal=causal,
        paged=paged,
    )
    prefetch = (lengths, block_table.astype(jnp.int32)) if paged else (lengths,)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_splits, n_rows, dv), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_splits, n_rows, 1), jnp.float32),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="mla_decode_tpu",
    )(*prefetch, q.reshape(batch, n_rows, d), cache)
    o, lse = combine_splits(o, lse[..., 0])
    return o.astype(q.dtype).reshape(batch, s_q, n_heads, dv), lse.reshape(batch, s_q, n_heads)
