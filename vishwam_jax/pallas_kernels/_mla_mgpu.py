"""MLA decode over the latent cache: the Pallas Mosaic GPU kernel for Hopper (TMA, wgmma, warp
specialisation), after FlashMLA's design.

Why a second GPU kernel. With 64 query rows per program (s_q x heads, all sharing the one latent
"head") MLA decode does ~240 flops per cache byte, so for 128 heads it is bound by the tensor cores,
not by HBM. The Triton lowering (`_mla_gpu`) cannot be told to keep the [64, 576] query and the
cache tiles in shared memory and feed them to asynchronous wgmma, nor to give the tile loads to a
producer warpgroup, and it lands at about a third of the dense matmul rate. Here every choice that
matters is explicit:

* One program = 64 query rows (one wgmma M) x one KV split x one batch row; three warpgroups. The
  memory warpgroup only issues TMA copies of 64-token tiles [64, 576] (one FlashMLA page) into a
  two-slot ring; the value is the first 512 channels of the same tile, so each cache byte is read
  from HBM once per program (the row tiles of one batch row are the grid's fastest axis, so they
  run side by side and share the tile through L2).
* Shared memory holds Q [64, 576] (72 KB) + two cache tiles (144 KB) + one P tile (8 KB) = 224 KB
  of the 227 KB an H100 block may have: there is no room for a second P buffer or a third stage.
* The output accumulator [64, 512] float32 would take 256 registers per thread in one warpgroup,
  so the value columns are split: warpgroup 0 computes S = Q K^T (K = 576), masks, runs the online
  softmax (log2 domain, exp2 is the native instruction), publishes P (bf16) and the rescale
  factor through shared memory, and accumulates O[:, :256]; warpgroup 1 waits for P and
  accumulates O[:, 256:]. While warpgroup 1 runs its P @ V, warpgroup 0 is already on the next
  tile's Q K^T. What is not hidden is warpgroup 0's softmax (the tensor cores wait for P); FlashMLA's
  "seesaw" (the two warpgroups take alternate tiles' Q K^T) would hide it at the price of a second
  rescale per tile. `PREFETCH_QK` (the default, 3-4 % faster on an H100; the benchmark's --tune-mgpu
  times both) issues the next Q K^T right behind warpgroup 0's own P @ V and awaits both together,
  instead of one after the other. Measured there: half the dense matmul rate, 1.5x the Triton kernel.
* Barriers: `k_full[slot]` (TMA done), `k_free[slot]` (both compute warpgroups finished with the
  tile: two arrivals), `p_full` / `p_free` (the single P buffer handed from warpgroup 0 to 1). After
  its loop warpgroup 0 sends the softmax denominator through the same P handshake, so both halves
  are normalised by one l.
* Stale cache slots past a row's length may hold anything, NaN included, and 0 * NaN would reach
  P @ V: only the tile that straddles the length has its rows past it zeroed in shared memory
  (by warpgroup 0, before it publishes P). Tiles past the length are never loaded.
* The output is staged through the query buffer (Q is dead once the last Q K^T has been waited
  for) and written by TMA; per split the normalised partial output and its log-sum-exp are
  written, and `_mla_gpu.combine_splits` merges them, as for the Triton kernel.

Rows of one program must belong to one query token, so the head count must be a multiple of 64
(DeepSeek-V3 has 128); s_q > 1 (causal among the new tokens) then needs no per-row masking beyond
the token's own visible length. Other shapes go to the Triton kernel (`supported`).

The kernel is written at lane level ("lane" lowering semantics, pinned: jax 0.10 and 0.11 default
to different ones). jax's GPU interpreter (interpret mode, for the tests on a CPU) lacks a few
operations the kernel needs (the accumulator store of the rescale, layout casts, a transposed wgmma
operand in jax 0.10); `_mgpu_interpret` adds them to the interpreter, never to the kernel, which
is the same code in both modes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels import _mgpu_interpret
from vishwam_jax.pallas_kernels._mla_gpu import combine_splits

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ROWS = 64  # query rows per program: one wgmma M
TILE = 64  # cache tokens per tile: one FlashMLA page
D, DV = 576, 512
HALF = DV // 2  # value columns per compute warpgroup
# Pallas Mosaic GPU lowers a kernel with per-lane ("lane") or per-warpgroup ("warpgroup") semantics;
# jax 0.10 defaults to the first, 0.11 to the second. The kernel is written for either; "lane" is pinned
# so both jax versions compile the same way (the benchmark's --tune-mgpu times the other).
SEMANTICS = "lane"
# Warpgroup 0 issues the next tile's Q K^T right behind its P @ V and awaits both together (no
# tensor-core bubble between them), carrying S across iterations; False: issue, await, then go on.
# Measured on an H100: 196.7 against 204.8 µs (128 heads, batch 64, 4K), 194.2 against 201.3 µs
# (batch 8, 32K); the lowering semantics made no difference (under 1 %).
PREFETCH_QK = True


def supported(q_shape, cache_shape, dtype, *, v_head_dim: int = DV) -> bool:
    """Whether `mla_decode_mgpu` takes these shapes: 576 = 512 + 64 channels, bf16 / f16, heads a
    multiple of 64, and 64-token tiles that do not cross a page (or the end of a contiguous cache)."""
    if len(q_shape) != 4 or len(cache_shape) != 3:
        return False
    d, heads = q_shape[-1], q_shape[2]
    if d != D or cache_shape[-1] != D or v_head_dim != DV or heads % ROWS:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    return cache_shape[1] % TILE == 0  # page size (paged) or slots (contiguous)


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu  # Mosaic GPU imports only where used

    return plgpu


def _kernel(*refs, s_q, n_heads, n_splits, page, capacity, paged, causal, scale_log2, dtype, prefetch_qk):
    plgpu = _plgpu()
    if paged:
        len_ref, bt_ref, q_ref, c_ref, o_ref, lse_ref, *scratch = refs
    else:
        len_ref, q_ref, c_ref, o_ref, lse_ref, *scratch = refs
        bt_ref = None
    q_smem, k_smem, p_smem, vec_smem, lse_smem, q_bar, k_full, k_free, p_full, p_free = scratch
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    rt, split, b = lax.axis_index("rows"), lax.axis_index("split"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    r0 = rt * ROWS
    length = len_ref[b]
    if causal:  # rows are (query, head) pairs, query-major: all 64 rows here are one query token
        visible = jnp.clip(length - s_q + r0 // n_heads + 1, 0, length)
    else:
        visible = length
    visible = jnp.minimum(visible, capacity)  # a length past the cache's end sees all of it (and no more)
    # this split's share of the visible tokens, in whole tiles (so no tile crosses two splits)
    chunk = pl.cdiv(pl.cdiv(visible, n_splits), TILE) * TILE
    start = split * chunk
    end = jnp.minimum(visible, start + chunk)
    n_tiles = pl.cdiv(jnp.maximum(end - start, 0), TILE)

    def cache_tile(i):
        t = start + i * TILE
        if paged:
            return c_ref.at[bt_ref[b, t // page], pl.ds(t % page, TILE)]
        return c_ref.at[b, pl.ds(t, TILE)]

    def store_rows(out, col):
        # TMA needs a contiguous shared-memory source: with (8, 64) tiles a column half of the
        # [64, 576] buffer is contiguous only 8 rows at a time
        for r in range(0, ROWS, 8):
            plgpu.copy_smem_to_gmem(out.at[pl.ds(r, 8)], o_ref.at[b, split, pl.ds(r0 + r, 8), pl.ds(col, HALF)])

    def scale_rows(x, v):
        return x * lax.broadcast_in_dim(v, x.shape, [0])

    @pl.when(wg == 2)
    def _memory_warpgroup():
        plgpu.set_max_registers(40, action="decrease")
        for i in range(2):

            @pl.when(i < n_tiles)
            def _prologue():
                plgpu.copy_gmem_to_smem(cache_tile(i), k_smem.at[i], k_full.at[i])

        @pl.loop(2, n_tiles + 2)
        def _steady(i):
            # i >= n_tiles only drains the ring: each waiter observes every phase of a barrier (the
            # GPU interpreter insists on it)
            slot = lax.rem(i, 2)
            src = cache_tile(jnp.minimum(i, n_tiles - 1))  # a paged tile's page id, read before the wait
            plgpu.barrier_wait(k_free.at[slot])  # both compute warpgroups are done with tile i - 2

            @pl.when(i < n_tiles)
            def _():
                plgpu.copy_gmem_to_smem(src, k_smem.at[slot], k_full.at[slot])

    @pl.when(wg == 0)
    def _softmax_warpgroup():
        plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, ROWS)], q_smem, q_bar.at[0])
        plgpu.barrier_wait(q_bar.at[0])

        def scores(i, pending=None):
            """S = Q K_i^T once tile i has landed; `pending` (issued first, then awaited with it)
            lets the previous tile's P @ V and this Q K^T run back to back on the tensor cores."""

            def qk(s_acc):
                if pending is not None:
                    pending()

                @pl.when(i < n_tiles)
                def _():
                    slot = lax.rem(i, 2)
                    plgpu.barrier_wait(k_full.at[slot])
                    plgpu.wgmma(s_acc, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))

                return s_acc[...]

            return pl.run_scoped(qk, plgpu.ACC((ROWS, TILE), jnp.float32))

        def body(o_acc):
            def step(i, carry):
                if prefetch_qk:
                    m, l, s = carry
                else:
                    m, l = carry
                    s = scores(i)
                slot = lax.rem(i, 2)
                t0 = start + i * TILE
                tile = k_smem.at[slot]
                cols = t0 + plgpu.broadcasted_iota(jnp.int32, (ROWS, TILE), 1, layout=wgmma_layout)
                s = jnp.where(cols < visible, s * scale_log2, -jnp.inf)  # also drops NaN from stale slots
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: no -inf - -inf
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)

                @pl.when(t0 + TILE > length)
                def _zero_stale_rows():  # 0 * NaN would survive P @ V
                    rows = plgpu.broadcasted_iota(jnp.int32, (TILE, 64), 0, layout=wgmma_layout)
                    keep = rows < length - t0
                    for c in range(DV // 64):
                        part = tile.at[:, pl.ds(c * 64, 64)]
                        part[...] = jnp.where(keep, part[...], jnp.zeros((TILE, 64), dtype))

                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(p_free.at[0])  # warpgroup 1 is done with the previous P

                p_smem[...] = p.astype(dtype)
                vec_smem[...] = alpha
                plgpu.commit_smem()  # generic-proxy writes (P, zeroed rows) before wgmma reads them
                plgpu.barrier_arrive(p_full.at[0])
                o_acc[...] = scale_rows(o_acc[...], alpha)

                def pv():
                    plgpu.wgmma(o_acc, p_smem, tile.at[:, pl.ds(0, HALF)])

                if prefetch_qk:
                    s_next = scores(i + 1, pending=pv)  # waits for both
                    plgpu.barrier_arrive(k_free.at[slot])
                    return m_new, l, s_next
                pv()
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_free.at[slot])
                return m_new, l

            m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
            l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
            carry = (m0, l0, scores(0)) if prefetch_qk else (m0, l0)
            carry = lax.fori_loop(0, n_tiles, step, carry)
            return o_acc[...], carry[0], carry[1]

        o, m, l = pl.run_scoped(body, plgpu.ACC((ROWS, HALF), jnp.float32))

        @pl.when(n_tiles > 0)
        def _():
            plgpu.barrier_wait(p_free.at[0])

        vec_smem[...] = l  # the denominator, to warpgroup 1 through the P handshake
        plgpu.barrier_arrive(p_full.at[0])
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        out = q_smem.at[:, pl.ds(0, HALF)]  # Q is dead: the last Q K^T was waited for
        out[...] = scale_rows(o, 1.0 / l_safe).astype(dtype)
        lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
        plgpu.commit_smem()
        store_rows(out, 0)
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, split, pl.ds(r0, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _value_warpgroup():
        plgpu.set_max_registers(232, action="increase")

        def body(o_acc):
            def step(i, _):
                slot = lax.rem(i, 2)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.barrier_wait(p_full.at[0])
                alpha = plgpu.layout_cast(vec_smem[...], row_layout)
                o_acc[...] = scale_rows(o_acc[...], alpha)
                plgpu.wgmma(o_acc, p_smem, k_smem.at[slot, :, pl.ds(HALF, HALF)])
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(p_free.at[0])
                plgpu.barrier_arrive(k_free.at[slot])

            lax.fori_loop(0, n_tiles, step, None)
            return o_acc[...]

        o = pl.run_scoped(body, plgpu.ACC((ROWS, HALF), jnp.float32))
        plgpu.barrier_wait(p_full.at[0])  # the denominator; warpgroup 0 is past its last Q K^T
        l = plgpu.layout_cast(vec_smem[...], row_layout)
        out = q_smem.at[:, pl.ds(HALF, HALF)]
        out[...] = scale_rows(o, 1.0 / jnp.where(l == 0.0, 1.0, l)).astype(dtype)
        plgpu.commit_smem()
        store_rows(out, HALF)
        plgpu.wait_smem_to_gmem(0)


@functools.partial(
    jax.jit,
    static_argnames=("softmax_scale", "v_head_dim", "causal", "num_splits", "interpret", "semantics", "prefetch_qk"),
)
def mla_decode_mgpu(
    q: Float[Array, "b s_q h 576"],
    cache: Float[Array, "b L 576"] | Float[Array, "num_blocks page 576"],
    lengths: Int[Array, " b"],
    block_table: Int[Array, "b max_blocks"] | None = None,
    *,
    softmax_scale: float,
    v_head_dim: int = DV,
    causal: bool = True,
    num_splits: int = 1,
    interpret: bool = False,
    semantics: str | None = None,
    prefetch_qk: bool | None = None,
) -> tuple[Float[Array, "b s_q h 512"], Float[Array, "b s_q h"]]:
    """(o, lse) as `_mla_gpu.mla_decode_gpu`; `supported` says which shapes it takes. block_table
    entries must already be valid page ids (mla_decode clips them). interpret: True (or an
    `InterpretGPUParams`) runs jax's GPU interpreter. semantics / prefetch_qk: None takes the module's
    SEMANTICS / PREFETCH_QK."""
    plgpu = _plgpu()
    batch, s_q, n_heads, d = q.shape
    paged = block_table is not None
    if not supported(q.shape, cache.shape, q.dtype, v_head_dim=v_head_dim):
        raise ValueError(
            f"the Mosaic GPU MLA kernel needs q [b, s_q, heads % 64 == 0, {D}] in bf16/f16, v_head_dim {DV} and "
            f"a cache of 64-token multiples; got q {q.shape} {q.dtype}, cache {cache.shape}, v_head_dim {v_head_dim} "
            "(implementation='pallas_gpu' takes other shapes)"
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    dtype = q.dtype
    n_rows = s_q * n_heads
    q2 = q.reshape(batch, n_rows, d)  # free: (s_q, h) are adjacent and contiguous
    cache = cache.astype(dtype)
    semantics = semantics or SEMANTICS
    if semantics not in ("lane", "warpgroup"):
        raise ValueError(f"semantics must be 'lane' or 'warpgroup', got {semantics!r}")
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((ROWS, D), dtype, transforms=tiled),  # Q, then the output
        plgpu.SMEM((2, TILE, D), dtype, transforms=tiled),  # the cache tile ring
        plgpu.SMEM((ROWS, TILE), dtype, transforms=tiled),  # P
        plgpu.SMEM((ROWS,), jnp.float32),  # rescale factor, then the denominator
        plgpu.SMEM((ROWS,), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=1),  # q loaded
        plgpu.Barrier(num_barriers=2),  # k_full
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # k_free
        plgpu.Barrier(num_barriers=1),  # p_full
        plgpu.Barrier(num_barriers=1),  # p_free
    ]
    body = functools.partial(
        _kernel,
        s_q=s_q,
        n_heads=n_heads,
        n_splits=num_splits,
        page=cache.shape[1],
        capacity=block_table.shape[1] * cache.shape[1] if paged else cache.shape[1],
        paged=paged,
        causal=causal,
        scale_log2=float(softmax_scale) * LOG2E,
        dtype=dtype,
        prefetch_qk=PREFETCH_QK if prefetch_qk is None else prefetch_qk,
    )
    body.__name__ = "mla_decode_mgpu"
    interpret = _mgpu_interpret.params(interpret)
    args = (lengths.astype(jnp.int32),) + ((block_table.astype(jnp.int32),) if paged else ()) + (q2, cache)
    o, lse = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((batch, num_splits, n_rows, DV), dtype),
            jax.ShapeDtypeStruct((batch, num_splits, n_rows), jnp.float32),
        ),
        scratch_types=scratch,
        # Mosaic GPU launches the last grid axis fastest (CUDA x): the row tiles of one batch row and
        # split run side by side and read each cache tile from HBM once between them (L2)
        grid=(batch, num_splits, n_rows // ROWS),
        grid_names=("batch", "split", "rows"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True,
            # no cross-warp reductions (a row's scores live in one warp): the 2 KB default reserve
            # would overflow the 227 KB
            reduction_scratch_bytes=0,
            lowering_semantics=getattr(plgpu.LoweringSemantics, semantics.capitalize()),
        ),
        interpret=interpret,
    )(*args)
    if num_splits == 1:
        o, lse = o[:, 0], lse[:, 0]
    else:
        o, lse = combine_splits(o, lse)
    return o.astype(dtype).reshape(batch, s_q, n_heads, DV), lse.reshape(batch, s_q, n_heads)
