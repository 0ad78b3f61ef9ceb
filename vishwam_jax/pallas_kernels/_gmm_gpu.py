"""Pallas (Triton lowering) grouped matmul kernels for GPUs; the same kernels run in interpret mode on CPU.

`gmm`: one program per (work item, N block). A work item is a (group, first row) pair. By default
(`make_work_items`) row tiles are aligned to the global tile grid: a tile that straddles a group
boundary is visited once per group and each visit stores only its own rows. With
`BlockConfig.group_aligned` (`make_group_aligned_work_items`) every group's tiles start at its own
first row instead, so a group of up to bm rows is one visit and its weights are read once, at the
cost of masked rows in a group's last tile. Either way empty groups get no work item, and the rows
past sum(group_sizes) form one extra "padding group" whose items store zeros without reading any
weights. Visits write disjoint rows, so programs never race.

`tgmm`: one program per (group, K block, N block), looping over that group's rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels._fp8_dot import fp8_dot


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    bm: int  # rows of lhs per work item
    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3
    band: int = 8  # work items visited together before moving to the next N block (L2 reuse)
    group_aligned: bool = False  # tiles start at each group's first row instead of the global grid
    k_splits: int = 1  # programs per (work item, N block), each over its share of K (summed after)


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (x - 1).bit_length()))


def _fit(config: BlockConfig, m: int, k: int, n: int) -> BlockConfig:
    """Shrink blocks that exceed a (power-of-two rounded) small dimension: fewer masked lanes."""
    return dataclasses.replace(
        config,
        bm=min(config.bm, _pow2_at_least(m)),
        bn=min(config.bn, _pow2_at_least(n)),
        bk=min(config.bk, _pow2_at_least(k)),
    )


SMEM_BUDGET = 200 * 1024  # H100/H200 allow 227 KiB per block; keep headroom for the epilogue


def _fit_smem(cfg: BlockConfig, lhs_itemsize: int, rhs_itemsize: int) -> BlockConfig:
    """Fewer pipeline stages, then a shorter K block, until the staged tiles fit in shared memory
    (float32 operands need twice the bf16 footprint)."""

    def smem(c):
        return c.num_stages * c.bk * (c.bm * lhs_itemsize + c.bn * rhs_itemsize)

    while smem(cfg) > SMEM_BUDGET and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    while smem(cfg) > SMEM_BUDGET and cfg.bk > 16:
        cfg = dataclasses.replace(cfg, bk=cfg.bk // 2)
    return cfg


# Block configs by expected rows per group (H100, bf16; docs/bench_gmm.md has the measurements). Few
# rows per group (decode, small batches) stream weights: small row tiles and a deep K block in flight.
# Many rows per group are compute-bound: wgmma-sized tiles with 8 warps and 3 stages, banded so that
# the programs running together share weight blocks in L2.
# With ~bm rows per group (Grok-1 decode at 64 tokens: 16 rows in each of 8 experts) most groups
# straddle two grid tiles and their weights are read twice; group-aligned tiles of at least twice the
# expected group size read each active expert once (2.29 against 2.72 ms there; `benchmark_gmm.py`
# times both tilings on every decode row).
DECODE_GROUP_ALIGNED = True
# Streaming with few programs (one DeepSeek-V3 token: 8 experts x 4096/128 N blocks = 256 programs for
# 132 SMs) needs more bytes in flight per SM: narrower N blocks (twice the programs) and six K blocks
# in flight: 0.378 / 0.396 ms against 0.433 / 0.459 ms on the two one-token DeepSeek-V3 shapes. With
# many programs (Grok-1's N=65536, DeepSeek-V3 at 64 tokens) the same config was slower (1.04 against
# 0.64 ms; 5.07 against 4.51 ms), so it applies below four waves of 132 SMs only; and to float
# weights only (int8 one-token DeepSeek-V3: 0.49 / 0.45 ms against 0.44 / 0.38 ms without it).
FEW_STREAMING_PROGRAMS = 4 * 132
STREAMING_FEW_PROGRAMS = BlockConfig(bm=16, bn=64, bk=128, num_warps=4, num_stages=6)
REGIME_CONFIGS = {
    16: BlockConfig(bm=16, bn=128, bk=128, num_warps=4, num_stages=4),
    48: BlockConfig(bm=32, bn=128, bk=128, num_warps=4, num_stages=4),
    96: BlockConfig(bm=64, bn=128, bk=64, num_warps=4, num_stages=4),
    None: BlockConfig(bm=128, bn=256, bk=64, num_warps=8, num_stages=3),
}


def gmm_config(
    m: int, k: int, n: int, g: int, lhs_itemsize: int = 2, rhs_itemsize: int = 2, group_aligned: bool | None = None
) -> BlockConfig:
    """The block config for a problem: by rows per group (if every group were equal), then fitted
    to the dimensions and to shared memory. `group_aligned` (default `DECODE_GROUP_ALIGNED`) picks
    the tiling of the streaming regime."""
    rows_per_group = m / max(1, min(g, m))
    limit = next((r for r in REGIME_CONFIGS if r is not None and rows_per_group <= r), None)
    cfg = REGIME_CONFIGS[limit]
    if limit == 16 and rhs_itemsize > 1 and min(g, m) * pl.cdiv(n, cfg.bn) < FEW_STREAMING_PROGRAMS:
        cfg = STREAMING_FEW_PROGRAMS
    if limit == 16 and rhs_itemsize == 1:  # int8 weights: twice the K per stage for the same bytes in flight
        cfg = dataclasses.replace(cfg, bk=2 * cfg.bk)
    if limit == 16 and (DECODE_GROUP_ALIGNED if group_aligned is None else group_aligned):
        cfg = dataclasses.replace(cfg, group_aligned=True, bm=_pow2_at_least(int(2 * rows_per_group)))  # <= 32
    return _fit_smem(_fit(cfg, m, k, n), lhs_itemsize, rhs_itemsize)


def tgmm_config(m: int, k: int, n: int, g: int, itemsize: int = 2) -> BlockConfig:
    cfg = BlockConfig(bm=64, bn=128, bk=128, num_warps=8, num_stages=3)
    return _fit_smem(_fit(cfg, m, k, n), itemsize, itemsize)


# ---------------------------------------------------------------------------------------------
# Work items


def max_work_items(m: int, g: int, bm: int, group_aligned: bool = False) -> int:
    """Static bound: every row tile once, plus one extra visit per group boundary inside a tile.

    With the padding group there are at most min(g + 1, m) non-empty groups, hence at most that
    many minus one boundaries. Group-aligned: sum of ceil(size / bm) over those groups, at most
    m / bm + one partial tile per group.
    """
    if group_aligned:
        return m // bm + min(g + 1, m)
    return pl.cdiv(m, bm) + max(0, min(g + 1, m) - 1)


def group_bounds(group_sizes: Int[Array, " g"], m: int) -> tuple[Int[Array, " g+1"], Int[Array, " g+1"]]:
    """[start, end) rows of every group plus the padding group (rows past the last group).

    Ends are clipped to m so an oversubscribed group_sizes can never index past the arrays.
    """
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def _count_at_most(sorted_ends: Int[Array, " g"], values: Int[Array, " w"]) -> Int[Array, " w"]:
    """searchsorted(sorted_ends, values, side="right") as one fused compare-and-count. The default
    binary search is a while loop, which on GPU costs a launch and a host round trip per step:
    ~45 µs per call, more than the one-token kernel it feeds (profiled on an H200)."""
    return jnp.searchsorted(sorted_ends, values, side="right", method="compare_all")


def make_work_items(
    group_sizes: Int[Array, " g"], m: int, bm: int
) -> tuple[Int[Array, " w"], Int[Array, " w"], Int[Array, " g+1"], Int[Array, " g+1"], Int[Array, "1"]]:
    """(group id, row tile id) per work item, sorted by row tile; and the live item count.

    Items past the count are padding of the static grid; the kernel skips them.
    """
    g = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    first_tile = starts // bm
    last_tile = (ends - 1) // bm
    tiles = jnp.where(ends > starts, last_tile - first_tile + 1, 0)
    item_end = jnp.cumsum(tiles)
    item_start = item_end - tiles
    w = jnp.arange(max_work_items(m, g, bm), dtype=jnp.int32)
    group_ids = jnp.minimum(_count_at_most(item_end, w), g).astype(jnp.int32)
    tile_ids = first_tile[group_ids] + w - item_start[group_ids]
    return group_ids, tile_ids.astype(jnp.int32), starts, ends, item_end[-1:].astype(jnp.int32)


def make_group_aligned_work_items(
    group_sizes: Int[Array, " g"], m: int, bm: int
) -> tuple[Int[Array, " w"], Int[Array, " w"], Int[Array, " g+1"], Int[Array, " g+1"], Int[Array, "1"]]:
    """(group id, first row) per work item, each group's tiles starting at its own first row; and
    the live item count. Items past the count are padding of the static grid; the kernel skips them."""
    g = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, m)
    tiles = (ends - starts + bm - 1) // bm
    item_end = jnp.cumsum(tiles)
    item_start = item_end - tiles
    w = jnp.arange(max_work_items(m, g, bm, group_aligned=True), dtype=jnp.int32)
    group_ids = jnp.minimum(_count_at_most(item_end, w), g).astype(jnp.int32)
    row_starts = starts[group_ids] + (w - item_start[group_ids]) * bm
    return group_ids, row_starts.astype(jnp.int32), starts, ends, item_end[-1:].astype(jnp.int32)


def work_item_rows(group_sizes: Int[Array, " g"], m: int, cfg: BlockConfig):
    """(group id, first row, starts, ends, live count) of the work items of `cfg`'s tiling."""
    if cfg.group_aligned:
        return make_group_aligned_work_items(group_sizes, m, cfg.bm)
    group_ids, tile_ids, starts, ends, count = make_work_items(group_sizes, m, cfg.bm)
    return group_ids, tile_ids * cfg.bm, starts, ends, count


# ---------------------------------------------------------------------------------------------
# gmm kernel


def _banded_program_ids(num_items, n_blocks: int, band: int):
    """Map the flat program id to (work item, N block) so that `band` consecutive work items sweep
    the N blocks together: their lhs rows stay in L2 across N blocks and the work items of one
    group share each weight block while it is in L2."""
    pid = pl.program_id(0)
    per_band = band * n_blocks
    first = (pid // per_band) * band
    width = jnp.maximum(jnp.minimum(num_items - first, band), 1)
    local = pid % per_band
    return first + local % width, local // width, first < num_items


def _gmm_kernel(
    group_ids_ref,
    row_starts_ref,
    starts_ref,
    ends_ref,
    num_items_ref,
    lhs_ref,
    rhs_ref,
    *rest,
    m: int,
    k: int,
    n: int,
    num_groups: int,
    cfg: BlockConfig,
    transpose_rhs: bool,
    has_scale: bool,
    compute_dtype,
    packed: bool = False,  # int16 pairs (`_int16_pair_operands`): along K if transpose_rhs, else along N
    block: tuple[int, int] | None = None,
    has_lhs_scale: bool = False,
):
    scale_ref = lhs_scale_ref = None
    if has_scale and has_lhs_scale:
        scale_ref, lhs_scale_ref, out_ref = rest
    elif has_scale:
        scale_ref, out_ref = rest
    else:
        (out_ref,) = rest
    bm, bn = cfg.bm, cfg.bn
    n_blocks = pl.cdiv(n, bn)
    item, n_block, band_live = _banded_program_ids(num_items_ref[0], n_blocks, cfg.band)
    live = band_live & (item < num_items_ref[0]) & (n_block < n_blocks)
    item = jnp.where(live, item, 0)
    group = group_ids_ref[item]
    row0 = row_starts_ref[item]
    col0 = n_block * bn
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    store_mask = (rows >= starts_ref[group]) & (rows < ends_ref[group]) & (cols < n)
    # Split K: this program's share of the K steps, and its own copy of the output rows. One share
    # keeps a static trip count (the loops measured in docs/bench_gmm.md).
    split, k_steps = (pl.program_id(1) if cfg.k_splits > 1 else 0), pl.cdiv(k, cfg.bk)
    steps_per_split = pl.cdiv(k_steps, cfg.k_splits)
    first_step = split * steps_per_split
    steps = (0, k_steps) if cfg.k_splits == 1 else (first_step, jnp.clip(k_steps - first_step, 0, steps_per_split))
    out_block = out_ref.at[pl.ds(split * m + row0, bm), pl.ds(col0, bn)]

    @pl.when(live & (group == num_groups))
    def _zero_padding_rows():
        plgpu.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=store_mask)

    @pl.when(live & (group < num_groups))
    def _compute():
        at = (lhs_ref, rhs_ref, group, row0, col0, rows, cols, steps)
        if packed:  # 1-byte weights as int16 pairs: along K of [g, n, k], along N of [g, k, n]
            loop = _gmm_k_loop_packed_k_major if transpose_rhs else _gmm_k_loop_packed
            acc = loop(
                *at, m=m, k=k, n=n, cfg=cfg, compute_dtype=compute_dtype,
                scale_ref=scale_ref if block is not None else None, block=block,
            )  # fmt: skip
        elif block is not None:
            acc = _gmm_k_loop_block_scaled(
                lhs_ref, rhs_ref, scale_ref, lhs_scale_ref, group, row0, col0, rows, steps,
                m=m, k=k, n=n, cfg=cfg, transpose_rhs=transpose_rhs, block=block, compute_dtype=compute_dtype,
            )  # fmt: skip
        else:
            acc = _gmm_k_loop(
                *at, m=m, k=k, n=n, cfg=cfg, transpose_rhs=transpose_rhs, compute_dtype=compute_dtype
            )  # fmt: skip
        if has_scale and block is None:  # int8 per output channel: one multiply of the accumulator
            scale_cols = col0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
            scale = plgpu.load(scale_ref.at[group, pl.ds(col0, bn)], mask=scale_cols < n, other=0.0)
            acc = acc * scale[None, :].astype(jnp.float32)
        plgpu.store(out_block, acc.astype(out_ref.dtype), mask=store_mask)


def _gmm_k_loop(
    lhs_ref, rhs_ref, group, row0, col0, rows, cols, steps, *, m, k, n, cfg, transpose_rhs, compute_dtype
):  # fmt: skip
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    ragged_k = k % bk != 0
    row_ok = rows < m  # [bm, 1]
    col_ok = cols < n  # [1, bn]
    first_step, num_steps = steps

    def body(i, acc):
        k0 = (first_step + i) * bk
        kk_row = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # k along lhs columns
        lhs_mask = row_ok & (kk_row < k) if ragged_k else row_ok
        a = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=lhs_mask, other=0)
        if transpose_rhs:  # rhs block [bn, bk]
            n_ok = col0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n
            rhs_mask = n_ok & (kk_row < k) if ragged_k else n_ok
            b = plgpu.load(rhs_ref.at[group, pl.ds(col0, bn), pl.ds(k0, bk)], mask=rhs_mask, other=0)
            dims = (((1,), (1,)), ((), ()))
        else:  # rhs block [bk, bn]
            kk_col = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
            rhs_mask = (kk_col < k) & col_ok if ragged_k else col_ok
            b = plgpu.load(rhs_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], mask=rhs_mask, other=0)
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(
            a.astype(compute_dtype), b.astype(compute_dtype), dims, preferred_element_type=jnp.float32
        )

    return lax.fori_loop(0, num_steps, body, jnp.zeros((bm, bn), jnp.float32))


def _gmm_k_loop_block_scaled(
    lhs_ref, rhs_ref, scale_ref, lhs_scale_ref, group, row0, col0, rows, steps, *, m, k, n, cfg, transpose_rhs,
    block, compute_dtype,
):  # fmt: skip
    """Float8 weights in b0 x b1 blocks (DeepSeek-V3's `weight_scale_inv`, over rhs as stored).

    The block config divides the blocks (`fit_block_scaled`), so every [bk, bn] weight tile lies in one
    block and its scale is one number: each K step's float32 partial product is scaled once and
    accumulated, the "promotion" of DeepSeek's FP8 GEMMs. Weight-only (`lhs_scale_ref` None): the
    tile is widened to the activation dtype in registers, so the weights cross HBM at one byte each.
    With `lhs_scale_ref` ([ceil(k/b_k), m]: lhs in 1 x b_k tiles along K) both operands stay float8
    and the product runs on the FP8 tensor cores. Masked lanes load a float 0.0: Pallas' Triton
    lowering has no integer-to-float8 cast (tests/test_gpu_lowering.py).
    """
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    block_k, block_n = (block[1], block[0]) if transpose_rhs else block
    n_blk = col0 // block_n
    row_ok = rows < m  # [bm, 1]
    row_ok_1d = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0) < m
    n_ok_row = col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1) < n
    first_step, num_steps = steps

    def body(i, acc):
        k0 = (first_step + i) * bk
        k_blk = k0 // block_k
        kk_row = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        a = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=row_ok & (kk_row < k), other=0.0)
        if transpose_rhs:  # rhs block [bn, bk]; blocks [n / b0, k / b1]
            n_ok = col0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n
            b = plgpu.load(rhs_ref.at[group, pl.ds(col0, bn), pl.ds(k0, bk)], mask=n_ok & (kk_row < k), other=0.0)
            w_scale = scale_ref[group, n_blk, k_blk]
            dims = (((1,), (1,)), ((), ()))
        else:  # rhs block [bk, bn]; blocks [k / b0, n / b1]
            kk_col = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
            b = plgpu.load(rhs_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], mask=(kk_col < k) & n_ok_row, other=0.0)
            w_scale = scale_ref[group, k_blk, n_blk]
            dims = (((1,), (0,)), ((), ()))
        if lhs_scale_ref is None:
            partial = lax.dot_general(
                a.astype(compute_dtype), b.astype(compute_dtype), dims, preferred_element_type=jnp.float32
            )
            return acc + partial * w_scale
        # the scales are loaded before the product, which Triton waits for: their latency then
        # overlaps the wgmma instead of following it
        a_scale = plgpu.load(lhs_scale_ref.at[k_blk, pl.ds(row0, bm)], mask=row_ok_1d, other=0.0)
        partial = fp8_dot(a, b, (dims[0][0][0], dims[0][1][0]))
        return acc + partial * (a_scale[:, None] * w_scale)

    return lax.fori_loop(0, num_steps, body, jnp.zeros((bm, bn), jnp.float32))


def _int16_bytes(w, float8: bool, compute_dtype):
    """The low and high bytes of int16 pairs `w` (little-endian: the pair's first element is the low
    byte), each widened to `compute_dtype`: int8 bytes sign-extended by shifts, float8 e4m3 bytes
    reinterpreted through int8 (the Triton lowering bitcasts only between equal widths)."""
    eight = jnp.int16(8)
    low = lax.shift_right_arithmetic(lax.shift_left(w, eight), eight)
    high = lax.shift_right_arithmetic(w, eight)

    def widen(byte_in_int16):
        if not float8:
            return byte_in_int16.astype(compute_dtype)
        return lax.bitcast_convert_type(byte_in_int16.astype(jnp.int8), jnp.float8_e4m3fn).astype(compute_dtype)

    return widen(low), widen(high)


def _gmm_k_loop_packed(
    lhs_ref, rhs_ref, group, row0, col0, rows, cols, steps, *, m, k, n, cfg, compute_dtype,
    scale_ref=None, block: tuple[int, int] | None = None,
):  # fmt: skip
    """[g, k, n] 1-byte weights read as int16 pairs of adjacent output columns (see
    `byte_offsets_overflow`).

    Each int16 holds column 2j in its low byte and 2j+1 in its high byte (little-endian bitcast);
    the two bytes are separated by shifts and multiplied separately, and the epilogue interleaves
    the even- and odd-column accumulators with two exact 0/1 float32 products (no reshape or strided
    store is needed, neither of which the Triton lowering offers). int8 bytes are sign-extended;
    with `block` the bytes are float8 e4m3 and each K step's partial sums take their block's scale
    (the tile lies in one block: `fit_block_scaled`).
    """
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    bn2, n2 = bn // 2, n // 2
    pair0 = col0 // 2
    row_ok = rows < m
    pair_ok = pair0 + lax.broadcasted_iota(jnp.int32, (1, bn2), 1) < n2
    first_step, num_steps = steps

    def body(i, accs):
        acc_even, acc_odd = accs
        k0 = (first_step + i) * bk
        kk_row = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        kk_col = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        a = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=row_ok & (kk_row < k), other=0)
        w = plgpu.load(rhs_ref.at[group, pl.ds(k0, bk), pl.ds(pair0, bn2)], mask=(kk_col < k) & pair_ok, other=0)
        even, odd = _int16_bytes(w, block is not None, compute_dtype)
        a = a.astype(compute_dtype)
        dims = (((1,), (0,)), ((), ()))
        step_even = lax.dot_general(a, even, dims, preferred_element_type=jnp.float32)
        step_odd = lax.dot_general(a, odd, dims, preferred_element_type=jnp.float32)
        if block is not None:
            w_scale = scale_ref[group, k0 // block[0], col0 // block[1]]
            step_even, step_odd = step_even * w_scale, step_odd * w_scale
        return acc_even + step_even, acc_odd + step_odd

    zeros = jnp.zeros((bm, bn2), jnp.float32)
    acc_even, acc_odd = lax.fori_loop(0, num_steps, body, (zeros, zeros))
    pair = lax.broadcasted_iota(jnp.int32, (bn2, bn), 0)
    col = lax.broadcasted_iota(jnp.int32, (bn2, bn), 1)
    to_even = (col == 2 * pair).astype(jnp.float32)
    to_odd = (col == 2 * pair + 1).astype(jnp.float32)
    exact = lax.Precision.HIGHEST  # IEEE float32: a 0/1 matrix moves values without rounding
    dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(
        acc_even, to_even, dims, precision=exact, preferred_element_type=jnp.float32
    ) + lax.dot_general(acc_odd, to_odd, dims, precision=exact, preferred_element_type=jnp.float32)


def _gmm_k_loop_packed_k_major(
    lhs_ref, rhs_ref, group, row0, col0, rows, cols, steps, *, m, k, n, cfg, compute_dtype,
    scale_ref=None, block: tuple[int, int] | None = None,
):  # fmt: skip
    """K-major [g, n, k] 1-byte weights read as int16 pairs of adjacent K elements (see
    `byte_offsets_overflow`): rhs_ref [g, n, k/2], lhs_ref [2, m, k/2] (lhs's even and odd K columns).

    A K step of bk elements is bk/2 pairs: the even columns meet the low bytes (K element 2i), the
    odd columns the high bytes (2i+1), and both products add into one accumulator. A sum over K does
    not depend on the order of its terms, so unlike pairs along N nothing is interleaved afterwards.
    With `block` the bytes are float8 e4m3 and each K step takes the scale of its block ([n / b0,
    k / b1] over rhs as stored; the step lies in one K block: `fit_block_scaled`).
    """
    bm, bn, half = cfg.bm, cfg.bn, cfg.bk // 2
    k2 = k // 2
    row_ok = rows < m  # [bm, 1]
    n_ok = col0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n  # [bn, 1]
    ragged = k2 % half != 0
    first_step, num_steps = steps
    dims = (((1,), (1,)), ((), ()))  # [bm, half] x [bn, half]
    # lhs_ref's halves; jnp scalars, as interpret mode's discharge of a load rejects a Python int index
    even, odd = jnp.int32(0), jnp.int32(1)

    def body(i, acc):
        p0 = (first_step + i) * half
        pair_ok = p0 + lax.broadcasted_iota(jnp.int32, (1, half), 1) < k2
        lhs_mask = row_ok & pair_ok if ragged else row_ok
        a_even = plgpu.load(lhs_ref.at[even, pl.ds(row0, bm), pl.ds(p0, half)], mask=lhs_mask, other=0.0)
        a_odd = plgpu.load(lhs_ref.at[odd, pl.ds(row0, bm), pl.ds(p0, half)], mask=lhs_mask, other=0.0)
        w_mask = n_ok & pair_ok if ragged else n_ok
        w = plgpu.load(rhs_ref.at[group, pl.ds(col0, bn), pl.ds(p0, half)], mask=w_mask, other=0)
        low, high = _int16_bytes(w, block is not None, compute_dtype)
        step = lax.dot_general(
            a_even.astype(compute_dtype), low, dims, preferred_element_type=jnp.float32
        ) + lax.dot_general(a_odd.astype(compute_dtype), high, dims, preferred_element_type=jnp.float32)
        if block is not None:
            step = step * scale_ref[group, col0 // block[0], 2 * p0 // block[1]]
        return acc + step

    return lax.fori_loop(0, num_steps, body, jnp.zeros((bm, bn), jnp.float32))


# Pallas' Triton lowering computes element offsets in int32 unless an operand exceeds 2**32 bytes, so
# an int8 operand of 2**31..2**32 elements (e.g. [256, 2048, 7168] DeepSeek-V3 experts on one device)
# would wrap around. Such weights are read as int16 pairs of adjacent elements along their last
# dimension instead (half the elements, same bytes): output columns of [g, k, n], K elements of K-major
# [g, n, k] (`pairs_fit`).
INT8_PACK_ABOVE = 2**31 - 1


def _fit_packed_epilogue(cfg: BlockConfig) -> BlockConfig:
    """Narrower N blocks until the int16-pair epilogue fits: its two exact float32 products keep
    their operands ([bm, bn/2] accumulator, [bn/2, bn] 0/1 matrix) in shared memory together,
    4·bn·(bm + bn) bytes (384 KiB at bm=128, bn=256: the launch failure this prevents)."""
    while 4 * cfg.bn * (cfg.bm + cfg.bn) > SMEM_BUDGET and cfg.bn > 32:
        cfg = dataclasses.replace(cfg, bn=cfg.bn // 2)
    return cfg


def byte_offsets_overflow(x) -> bool:
    """Whether a 1-byte operand (int8, float8) has 2**31..2**32 elements: offsets into it wrap around
    in the Triton lowering's int32 arithmetic."""
    return jnp.dtype(x.dtype).itemsize == 1 and INT8_PACK_ABOVE < x.size <= 2**32


def pairs_fit(rhs) -> bool:
    """Whether 1-byte weights can be read as int16 pairs: their last dimension as stored (N of
    [g, k, n], K of [g, n, k]) is even, so that no pair spans two rows."""
    return rhs.shape[-1] % 2 == 0


def _int16_pair_operands(lhs, rhs, cfg: BlockConfig, transpose_rhs: bool):
    """(lhs, rhs, cfg) for the int16-pair loops. rhs: adjacent bytes of its last dimension bitcast to
    one int16. K-major ([g, n, k]): lhs split into its even and odd K columns, [2, m, k/2], one cheap
    pass over the activations so that the kernel multiplies each byte of a pair by its own lhs tile.
    [g, k, n]: N blocks narrowed for the interleaving epilogue."""
    pairs = lax.bitcast_convert_type(rhs.reshape(*rhs.shape[:-1], rhs.shape[-1] // 2, 2), jnp.int16)
    if not transpose_rhs:
        return lhs, pairs, _fit_packed_epilogue(cfg)
    if cfg.bk % 2:
        raise ValueError(f"int16 pairs along K need an even K step, not bk={cfg.bk}")
    m, k = lhs.shape
    return lhs.reshape(m, k // 2, 2).transpose(2, 0, 1), pairs, cfg


def _compiler_params(cfg: BlockConfig):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Array,  # [g, k, n], or [g, n, k] when transpose_rhs; float or int8
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    rhs_scale: Float[Array, "g n"] | None = None,
    out_dtype=None,
    config: BlockConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    cfg = config or gmm_config(m, k, n, g, jnp.dtype(lhs.dtype).itemsize, jnp.dtype(rhs.dtype).itemsize)
    compute_dtype = lhs.dtype if jnp.issubdtype(rhs.dtype, jnp.integer) else jnp.promote_types(lhs.dtype, rhs.dtype)
    packed = byte_offsets_overflow(rhs)
    if packed and not pairs_fit(rhs):
        raise NotImplementedError(
            f"int8 rhs of shape {rhs.shape} (2**31..2**32 elements) with transpose_rhs={transpose_rhs}: Pallas' "
            "Triton lowering would overflow its 32-bit offsets, and the int16 pairs that avoid it need an even "
            "last dimension (n of [g, k, n], k of [g, n, k]); pad it, or shard the experts so that one device "
            "holds fewer than 2**31 weights"
        )
    if packed:
        lhs, rhs, cfg = _int16_pair_operands(lhs, rhs, cfg, transpose_rhs)
    operands = (lhs, rhs) + (() if rhs_scale is None else (rhs_scale.astype(jnp.float32),))
    return _launch(
        operands, group_sizes, (m, k, n, g), cfg, out_dtype, interpret, "vishwam_gmm",
        transpose_rhs=transpose_rhs, has_scale=rhs_scale is not None, compute_dtype=compute_dtype, packed=packed,
    )  # fmt: skip


def _launch(operands, group_sizes, dims, cfg: BlockConfig, out_dtype, interpret: bool, name: str, **options):
    """`_gmm_kernel` over `cfg`'s work items, one program per (work item, N block); `operands` are
    (lhs, rhs, scales...) and `options` the kernel's keyword options."""
    m, k, n, g = dims
    meta = work_item_rows(group_sizes, m, cfg)
    n_items = max_work_items(m, g, cfg.bm, cfg.group_aligned)
    grid = (pl.cdiv(n_items, cfg.band) * cfg.band * pl.cdiv(n, cfg.bn),)
    splits = cfg.k_splits
    kernel = functools.partial(_gmm_kernel, m=m, k=k, n=n, num_groups=g, cfg=cfg, **options)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits * m, n), out_dtype if splits == 1 else jnp.float32),
        grid=grid if splits == 1 else grid + (splits,),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name=name,
    )(*meta, *operands)
    return out if splits == 1 else out.reshape(splits, m, n).sum(axis=0).astype(out_dtype)


def split_k(cfg: BlockConfig, m: int, k: int, n: int, g: int, num_sms: int = 132) -> BlockConfig:
    """More programs for a call that would run too few to stream its weights (a batch-1 dense
    projection: one row tile times N / bn blocks, each over all of K): K split into up to enough
    shares of at least 4 steps to fill the SMs twice; their float32 partial sums are added after."""
    programs = max_work_items(m, g, cfg.bm, cfg.group_aligned) * pl.cdiv(n, cfg.bn)
    k_steps = pl.cdiv(k, cfg.bk)
    splits = min(pl.cdiv(2 * num_sms, programs), k_steps // 4)
    return dataclasses.replace(cfg, k_splits=splits) if programs < num_sms and splits > 1 else cfg


def supports_block(block: tuple[int, int]) -> bool:
    """Blocks the block-scaled kernel takes: powers of two of at least 16 (DeepSeek's 128 x 128)."""
    return all(b >= 16 and b & (b - 1) == 0 for b in block)


def fit_block_scaled(cfg: BlockConfig, block_k: int, block_n: int) -> BlockConfig:
    """Tiles that divide the scale blocks (K steps of at most b_k, N blocks of at most b_n; both powers
    of two), so that every weight tile has one scale."""
    return dataclasses.replace(cfg, bk=min(cfg.bk, block_k), bn=min(cfg.bn, block_n))


WGMMA_ROWS = 64  # one warpgroup's M


def gmm_block_scaled(
    lhs: Array,  # [m, k]: float (weight-only), or float8 e4m3 with lhs_scale
    rhs: Array,  # [g, k, n], or [g, n, k] when transpose_rhs; float8 e4m3
    group_sizes: Int[Array, " g"],
    rhs_scale: Float[Array, "g rb cb"],
    *,
    block: tuple[int, int],
    lhs_scale: Float[Array, "m kb"] | None = None,
    transpose_rhs: bool = False,
    out_dtype=None,
    config: BlockConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """`gmm` with float8 weights and one float32 scale per `block` of each group's matrix as stored.

    lhs_scale: float32 [m, ceil(k / b_k)], lhs being float8 in 1 x b_k tiles along K (b_k: the block's
    K side); then both operands meet on the FP8 tensor cores. Without it lhs is bf16/float32 and only
    the weights are float8 (decode). Accumulation is float32, one scale product per K block."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or (jnp.bfloat16 if lhs_scale is not None else lhs.dtype))
    if not supports_block(block):
        raise ValueError(f"block-scaled gmm takes power-of-two blocks of at least 16, not {block}")
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    block_k, block_n = (block[1], block[0]) if transpose_rhs else block
    lhs_itemsize = jnp.dtype(lhs.dtype).itemsize
    cfg = config or gmm_config(m, k, n, g, lhs_itemsize, 1)
    if lhs_scale is not None and config is None and cfg.bm < WGMMA_ROWS:
        # Few rows per expert (decode): Triton issues FP8 wgmma only for row tiles of at least 64, and
        # otherwise widens both operands to float16 for mma. The idle rows cost tensor-core time that
        # a weight-streaming call has to spare; the weights then reach wgmma as bytes, unconverted.
        cfg = dataclasses.replace(cfg, bm=WGMMA_ROWS, num_warps=4)
    if lhs_scale is not None and config is None:
        # One K step per scale block: every step ends in a wait for its wgmma and a scaled add
        # (DeepSeek's promotion), so a step of the whole 128 halves that overhead against the bf16
        # regime's 64, in the same shared memory as bf16 tiles of 64.
        cfg = dataclasses.replace(cfg, bk=max(cfg.bk, min(block_k, _pow2_at_least(k))))
    cfg = _fit_smem(fit_block_scaled(cfg, block_k, block_n), lhs_itemsize, 1)
    if not block_scaled_takes(lhs, rhs, transpose_rhs):
        raise NotImplementedError(
            f"float8 operands {lhs.shape} x {rhs.shape}: one has 2**31..2**32 elements, whose offsets Pallas' "
            "Triton lowering would overflow; only weight-only weights with an even last dimension (n of "
            "[g, k, n], k of [g, n, k]) are read as int16 pairs (grouped_matmul dequantizes the others)"
        )
    packed = byte_offsets_overflow(rhs)
    if packed:
        lhs, rhs, cfg = _int16_pair_operands(lhs, rhs, cfg, transpose_rhs)
    if config is None:
        cfg = split_k(cfg, m, k, n, g)
    operands = (lhs, rhs, rhs_scale.astype(jnp.float32))
    if lhs_scale is not None:
        # Transposed so that a K step reads its row tile's scales contiguously.
        operands += (lhs_scale.astype(jnp.float32).T,)
    return _launch(
        operands, group_sizes, (m, k, n, g), cfg, out_dtype, interpret,
        "vishwam_gmm_fp8" if lhs_scale is not None else "vishwam_gmm_fp8_weights",
        transpose_rhs=transpose_rhs, has_scale=True, compute_dtype=lhs.dtype if lhs_scale is None else None,
        block=block, has_lhs_scale=lhs_scale is not None, packed=packed,
    )  # fmt: skip


def block_scaled_takes(lhs, rhs, transpose_rhs: bool) -> bool:
    """Whether `gmm_block_scaled` can address these operands: float8 activations of 2**31..2**32
    elements never; weights of that size only weight-only, with an even last dimension as stored (n of
    [g, k, n], k of [g, n, k]: int16 pairs along N or K). `transpose_rhs` says which side is paired;
    either takes the same test."""
    if byte_offsets_overflow(lhs):
        return False
    if not byte_offsets_overflow(rhs):
        return True
    return jnp.dtype(lhs.dtype).itemsize > 1 and pairs_fit(rhs)


# ---------------------------------------------------------------------------------------------
# tgmm kernel: out[g] = lhs[rows of g].T @ grad[rows of g]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, k: int, n: int, cfg: BlockConfig):
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    group, k_block, n_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]
    k0, col0 = k_block * bk, n_block * bn
    kk = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)

    def body(i, acc):
        rows = start + i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        row_ok = rows < end
        a = plgpu.load(lhs_ref.at[pl.ds(start + i * bm, bm), pl.ds(k0, bk)], mask=row_ok & (kk < k), other=0)
        b = plgpu.load(grad_ref.at[pl.ds(start + i * bm, bm), pl.ds(col0, bn)], mask=row_ok & (cols < n), other=0)
        dtype = jnp.promote_types(a.dtype, b.dtype)
        return acc + lax.dot_general(
            a.astype(dtype), b.astype(dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, pl.cdiv(end - start, bm), body, jnp.zeros((bk, bn), jnp.float32))
    out_mask = (k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < k) & (cols < n)
    plgpu.store(out_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], acc.astype(out_ref.dtype), mask=out_mask)


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    out_dtype=None,
    config: BlockConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "g k n"]:
    m, k = lhs.shape
    n = grad.shape[1]
    g = group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((g, k, n), out_dtype)
    cfg = config or tgmm_config(m, k, n, g, max(lhs.dtype.itemsize, grad.dtype.itemsize))
    starts, ends = group_bounds(group_sizes, m)
    kernel = functools.partial(_tgmm_kernel, k=k, n=n, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        grid=(g, pl.cdiv(k, cfg.bk), pl.cdiv(n, cfg.bn)),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="vishwam_tgmm",
    )(starts, ends, lhs, grad)


# ---------------------------------------------------------------------------------------------
# tgmm of float8 operands in token tiles (FP8 training's weight gradient)


def _tgmm_fp8_kernel(
    starts_ref, ends_ref, lhs_ref, grad_ref, lhs_scale_ref, grad_scale_ref, out_ref, *, k, n, cfg, tile, num_tiles,
    tokens_last,
):  # fmt: skip
    """One program per (group, K block, N block): the group's rows a token tile at a time. Tiles are
    the global `tile`-row tiles the scales were computed over (a tile may straddle two groups; each
    group masks the other's rows), so within a tile every column of lhs and of grad has one scale
    and the tile's float32 partial product takes their outer product.

    tokens_last: lhs [k, m] and grad [n, m], the contracted tokens contiguous. FP8 wgmma reads both
    operands K-major from shared memory, which here means tokens last: Triton then streams both
    tiles with asynchronous copies, where token-major tiles are loaded synchronously and transposed
    at every step (the compiled kernels' TTGIR)."""
    bk, bn = cfg.bk, cfg.bn
    group, k_block, n_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]
    k0, col0 = k_block * bk, n_block * bn
    kk = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    kk_1d = k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    cols_1d = col0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)

    def scales(t):
        sa = plgpu.load(lhs_scale_ref.at[t, pl.ds(k0, bk)], mask=kk_1d < k, other=0.0)
        sb = plgpu.load(grad_scale_ref.at[t, pl.ds(col0, bn)], mask=cols_1d < n, other=0.0)
        return sa[:, None] * sb[None, :]

    if not tokens_last:
        first = start // tile
        n_tiles = jnp.where(end > start, (end - 1) // tile - first + 1, 0)

        def body(i, acc):
            t = first + i
            rows = t * tile + lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
            row_ok = (rows >= start) & (rows < end)
            a = plgpu.load(lhs_ref.at[pl.ds(t * tile, tile), pl.ds(k0, bk)], mask=row_ok & (kk < k), other=0.0)
            b = plgpu.load(grad_ref.at[pl.ds(t * tile, tile), pl.ds(col0, bn)], mask=row_ok & (cols < n), other=0.0)
            return acc + fp8_dot(a, b, (0, 0)) * scales(t)

        acc = lax.fori_loop(0, n_tiles, body, jnp.zeros((bk, bn), jnp.float32))
    else:
        # Tiles wholly inside the group load with no token mask, so their bytes stay contiguous and
        # Triton streams them with asynchronous copies (a mask that varies along the contiguous
        # tokens would make them byte loads); the at most two tiles a group boundary cuts are added
        # after, masked (a flag folded into the mask drops one that does not exist).
        k_ok = k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < k
        n_ok = col0 + lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n

        def product(t, token_ok):
            a = plgpu.load(lhs_ref.at[pl.ds(k0, bk), pl.ds(t * tile, tile)], mask=k_ok & token_ok, other=0.0)
            b = plgpu.load(grad_ref.at[pl.ds(col0, bn), pl.ds(t * tile, tile)], mask=n_ok & token_ok, other=0.0)
            return fp8_dot(a, b, (1, 1)) * scales(t)

        first_full = pl.cdiv(start, tile)
        n_full = jnp.maximum(end // tile - first_full, 0)
        every_token = jnp.ones((1, tile), jnp.bool_)
        acc = lax.fori_loop(
            0, n_full, lambda i, acc: acc + product(first_full + i, every_token), jnp.zeros((bk, bn), jnp.float32)
        )
        last_tile = num_tiles - 1
        head, tail = jnp.minimum(start // tile, last_tile), jnp.clip((end - 1) // tile, 0, last_tile)
        has_head = (end > start) & (start % tile != 0)
        has_tail = (end > start) & (end % tile != 0) & ((tail != head) | ~has_head)
        for t, present in ((head, has_head), (tail, has_tail)):
            tokens = t * tile + lax.broadcasted_iota(jnp.int32, (1, tile), 1)
            acc = acc + product(t, present & (tokens >= start) & (tokens < end))
    out_mask = (k0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < k) & (cols < n)
    plgpu.store(out_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], acc.astype(out_ref.dtype), mask=out_mask)


def tgmm_fp8(
    lhs: Array,  # [m, k] float8 e4m3 ([k, m] when tokens_last)
    lhs_scale: Float[Array, "mt k"],  # [ceil(m / tile), k]: one scale per `tile` rows of each column
    grad: Array,  # [m, n] float8 e4m3 ([n, m] when tokens_last)
    grad_scale: Float[Array, "mt n"],
    group_sizes: Int[Array, " g"],
    *,
    tile: int = 128,
    tokens_last: bool = False,
    out_dtype=jnp.float32,
    config: BlockConfig | None = None,
    interpret: bool = False,
) -> Float[Array, "g k n"]:
    """Per group lhs_g^T @ grad_g of two float8 operands quantized in `tile` x 1 token tiles (global
    row tiles), on the FP8 tensor cores; float32 accumulation, one scale product per tile.
    tokens_last: both operands are given transposed, tokens on their last axis (the fast layout)."""
    if tokens_last:
        (k, m), n = lhs.shape, grad.shape[0]
    else:
        (m, k), n = lhs.shape, grad.shape[1]
    g = group_sizes.shape[0]
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tgmm_fp8 takes a power-of-two token tile of at least 16, not {tile}")
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((g, k, n), out_dtype)
    cfg = config or BlockConfig(bm=tile, bn=128, bk=128, num_warps=8, num_stages=3)
    cfg = dataclasses.replace(_fit(cfg, m, k, n), bm=tile)
    starts, ends = group_bounds(group_sizes, m)
    kernel = functools.partial(
        _tgmm_fp8_kernel, k=k, n=n, cfg=cfg, tile=tile, num_tiles=pl.cdiv(m, tile), tokens_last=tokens_last
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        grid=(g, pl.cdiv(k, cfg.bk), pl.cdiv(n, cfg.bn)),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="vishwam_tgmm_fp8",
    )(starts, ends, lhs, grad, lhs_scale.astype(jnp.float32), grad_scale.astype(jnp.float32))
