"""FP8 grouped matmul with DeepSeek-V3's fine-grained scales: the Pallas Mosaic GPU kernel for Hopper.

    out[rows of g] = sum over K blocks kb of  a_scale[row, kb] * b_scale[g, n / 128, kb] * (a_kb @ b_g,kb^T)

with a float8 e4m3 [m, k] in 1 x 128 tiles along K and b float8 e4m3 stored K-major [g, n, k] in
128 x 128 blocks, both as FP8 training and the DeepSeek release lay them out.

Why a second kernel beside the Triton one (`_gmm_gpu.gmm_block_scaled`). Every 128-wide K block
ends in a "promotion": its float32 partial product, scaled by both operands' scales, is added to the
running sum (an FP8 wgmma cannot apply a scale per K block itself). In a Triton program the one
instruction stream issues the wgmma, waits for it and promotes, so the tensor cores idle during every
promotion; measured on an H100, the Triton kernel reached 0.20x our bf16 gmm. Here the work is split
by warpgroup, after DeepGEMM's design:

* A memory warpgroup only issues TMA copies: the activation tile [128, 128], the weight tile
  [tile_n, 128] (K-major, as FP8 wgmma reads it) and the row tile's 128 activation scales, into a
  ring of `stages` slots (`plgpu.emit_pipeline_warp_specialized`).
* Two compute warpgroups own 64 rows each. Each runs its K loop on its own barrier schedule: one
  wgmma into a fresh accumulator, wait, promote into the float32 sum. While one promotes, the
  other's wgmma keeps the tensor cores busy. Each weight block's scale is read from global memory
  one K step ahead of its use, so the load's latency hides behind a whole step. `Config.k_blocks=2`
  also overlaps within a warpgroup: each step takes two K blocks, issues both wgmmas into two
  accumulators, and promotes the first while the second runs.
* TMA addresses every operand with 32-bit coordinates per dimension: weights of more than 2**31
  bytes (DeepSeek-V3's 256 experts on one device) need no fallback here.
* Programs are persistent (one per SM) and walk (work item, N tile) pairs; a work item is a row
  tile of one group (`_gmm_gpu.make_work_items`, the Triton kernel's schedule). A row tile that
  straddles a group boundary is computed once per group, and each pass stores only its group's
  rows, by TMA copies of 64, 32, ..., 1 rows. Rows past the last group get zeros (the padding
  group's items skip the product).

The kernel is written with warpgroup lowering semantics, pinned (jax 0.10 and 0.11 default to
different ones). jax's GPU interpreter runs it on a CPU for the tests (`interpret=True`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels import _gmm_gpu, _mgpu_interpret

BLOCK = 128  # DeepSeek's scale block; one K step of the kernel
WG_ROWS = 64  # one compute warpgroup's rows: one wgmma M
TILE_M = 2 * WG_ROWS
H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class Config:
    """tile_n: output columns per program (a divisor of 128, so one weight scale per tile and K block);
    stages: TMA ring slots; band: work items that sweep the N tiles together (their activation rows
    and one group's weight tiles stay in L2); k_blocks: 128-wide K blocks per pipeline step. With 2,
    a warpgroup issues both blocks' wgmmas into two accumulators and promotes the first while the
    second runs (DeepGEMM's overlap within one warpgroup; half the stages fit)."""

    tile_n: int = 128
    stages: int = 4
    band: int = 8
    k_blocks: int = 1


DEFAULT = Config()
NARROW = Config(tile_n=64, stages=6)  # N a multiple of 64 only (576 = 512 + 64, MLA's latent and rope)


def config_for(n: int) -> Config:
    """The default config whose N tile divides n."""
    return DEFAULT if n % DEFAULT.tile_n == 0 else NARROW


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu  # Mosaic GPU imports only where used

    return plgpu


def supported(lhs_shape, rhs_shape, block: tuple[int, int], transpose_rhs: bool, config: Config | None = None) -> bool:
    """Whether `gmm_fp8_mgpu` takes these operands: K-major weights in 128 x 128 blocks, k a multiple
    of 128 and n of the N tile (by default, `config_for(n)`'s)."""
    m, k = lhs_shape
    _, n, k2 = rhs_shape
    config = config or config_for(n)
    return (
        transpose_rhs
        and tuple(block) == (BLOCK, BLOCK)
        and k == k2
        and k % (BLOCK * config.k_blocks) == 0
        and n % config.tile_n == 0
        and BLOCK % config.tile_n == 0
        and m > 0
    )


def _store_rows(plgpu, out_smem, out_gmem, first: int, smem_row, count, row_limit: int) -> None:
    """TMA copies of rows [smem_row, smem_row + count) of out_smem to rows first + smem_row... of
    out_gmem: a descriptor needs a static box, so `count` (dynamic, at most row_limit) goes out as
    its binary digits, 64 + 32 + ... + 1 rows."""
    size = 1 << (row_limit.bit_length() - 1)
    while size:
        has = (count & size) != 0

        @pl.when(has)
        def _copy(smem_row=smem_row, size=size):
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(smem_row, size)], out_gmem.at[pl.ds(first + smem_row, size)])

        smem_row = smem_row + jnp.where(has, size, 0)
        size //= 2


def _kernel(
    group_ids,
    row_tiles,
    starts,
    ends,
    live_items,
    a_gmem,
    a_scale_gmem,
    b_gmem,
    b_scale_gmem,
    out_gmem,
    *,
    num_items: int,
    num_groups: int,
    cfg: Config,
):
    plgpu = _plgpu()
    _, k = a_gmem.shape
    n = out_gmem.shape[1]
    step_k = BLOCK * cfg.k_blocks
    k_steps, n_tiles = k // step_k, n // cfg.tile_n
    out_dtype = out_gmem.dtype
    fp8_tiles = (plgpu.TilingTransform((8, BLOCK)), plgpu.SwizzleTransform(128))  # 128 one-byte elements a row

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((TILE_M, step_k), lambda kb: (0, kb), transforms=fp8_tiles),
                plgpu.BlockSpec((cfg.tile_n, step_k), lambda kb: (0, kb), transforms=fp8_tiles),
                plgpu.BlockSpec((cfg.k_blocks, TILE_M), lambda kb: (kb, 0)),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=context,
        )

    ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the functions

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(
            a_gmem.at[pl.ds(0, TILE_M)], b_gmem.at[0, pl.ds(0, cfg.tile_n)], a_scale_gmem.at[:, pl.ds(0, TILE_M)]
        ),
        out_smem=plgpu.SMEM((2, WG_ROWS, cfg.tile_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        live = live_items[0]

        @plgpu.nd_loop((num_items * n_tiles,), collective_axes="sm")
        def _item(info: plgpu.NDLoopInfo):
            item, n_tile = plgpu.planar_snake(info.index[0], (num_items, n_tiles), 0, cfg.band)
            group = group_ids[item]
            # a multiple of the tile that the compiler can see (a row loaded as such fails layout inference)
            tile_row = row_tiles[item] * TILE_M
            # this warpgroup's rows of the item's group, relative to its 64-row slab
            slab = tile_row + wg * WG_ROWS
            lo = jnp.clip(starts[group] - slab, 0, WG_ROWS)
            hi = jnp.clip(ends[group] - slab, 0, WG_ROWS)
            out_tile = out_gmem.at[:, pl.ds(n_tile * cfg.tile_n, cfg.tile_n)]

            def store(acc):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slab's previous copies have read it
                out_smem[wg] = acc.astype(out_dtype)
                plgpu.commit_smem()
                _store_rows(plgpu, out_smem.at[wg], out_tile, slab, lo, jnp.maximum(hi - lo, 0), WG_ROWS)

            def weight_scales(step):  # the step's K blocks' weight scales (the last step's past the end)
                first = jnp.minimum(step, k_steps - 1) * cfg.k_blocks
                return tuple(b_scale_gmem[group, n_tile * cfg.tile_n // BLOCK, first + j] for j in range(cfg.k_blocks))

            def promote(idxs, a_smem, b_smem, a_scale_smem, carry):
                (step,) = idxs
                acc, b_scales = carry
                next_b_scales = weight_scales(step + 1)  # a whole step ahead of their use: the loads' latency hides
                rows = pl.ds(wg * WG_ROWS, WG_ROWS)

                def products(*part_refs):
                    for j, part_ref in enumerate(part_refs):
                        cols = pl.ds(j * BLOCK, BLOCK)
                        plgpu.wgmma(part_ref, a_smem.at[rows, cols], plgpu.transpose_ref(b_smem.at[:, cols], (1, 0)))
                    out = acc
                    for j, part_ref in enumerate(part_refs):
                        # block j done, the later ones may still run on the tensor cores while it is promoted
                        part = plgpu.wgmma_accumulator_load(part_ref, wait_n=cfg.k_blocks - 1 - j)
                        row_scales = plgpu.load(a_scale_smem.at[j], rows, layout=plgpu.Layout.WGMMA.reduce(1))
                        out = out + part * lax.broadcast_in_dim(row_scales * b_scales[j], part.shape, [0])
                    return out

                part_types = [plgpu.ACC((WG_ROWS, cfg.tile_n), jnp.float32)] * cfg.k_blocks
                return pl.run_scoped(products, *part_types), next_b_scales

            def zeros():
                return plgpu.layout_cast(jnp.zeros((WG_ROWS, cfg.tile_n), jnp.float32), plgpu.Layout.WGMMA)

            def context(run):
                acc, _ = run((zeros(), weight_scales(0)))
                store(acc)

            @pl.when((item < live) & (group < num_groups))
            def _product():
                pipeline(promote, context)(
                    a_gmem.at[pl.ds(tile_row, TILE_M)],
                    b_gmem.at[group, pl.ds(n_tile * cfg.tile_n, cfg.tile_n)],
                    a_scale_gmem.at[:, pl.ds(tile_row, TILE_M)],
                    allocations=allocations,
                )

            @pl.when((item < live) & (group == num_groups) & (wg < 2))
            def _padding_rows():  # rows past the last group: zeros, no product
                store(zeros())

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms() -> int:
    device = jax.devices()[0]
    return getattr(device, "core_count", H100_SMS) if device.platform == "gpu" else H100_SMS


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "num_programs"))
def gmm_fp8_mgpu(
    lhs: Array,
    lhs_scale: Float[Array, "m kb"],
    rhs: Array,
    rhs_scale: Float[Array, "g nb kb"],
    group_sizes: Int[Array, " g"],
    *,
    out_dtype=jnp.float32,
    config: Config | None = None,
    interpret: bool = False,
    num_programs: int | None = None,
) -> Float[Array, "m n"]:
    """`grouped_matmul.gmm_fp8` of float8 lhs [m, k] (scales [m, k / 128]) and K-major float8 rhs
    [g, n, k] (scales [g, n / 128, k / 128]) on Hopper's FP8 tensor cores, float32 accumulation.
    `supported` says which shapes it takes. interpret: jax's GPU interpreter (CPU tests);
    num_programs: the persistent grid (default: one program per SM; 3 in interpret mode, where every
    program is simulated thread by thread)."""
    plgpu = _plgpu()
    m, k = lhs.shape
    g, n, _ = rhs.shape
    config = config or config_for(n)
    if not supported(lhs.shape, rhs.shape, (BLOCK, BLOCK), True, config):
        raise ValueError(
            f"the Mosaic GPU fp8 gmm takes lhs [m, k % 128 == 0] and K-major rhs [g, n % {config.tile_n} == 0, k] in "
            f"128 x 128 blocks; got {lhs.shape} and {rhs.shape}"
        )
    group_ids, tile_ids, starts, ends, live = _gmm_gpu.make_work_items(group_sizes.astype(jnp.int32), m, TILE_M)
    # TMA reads the scales transposed, a row tile's 128 scales per K block contiguous; each row of the
    # transposed array must start 16-byte aligned, so the rows are padded to whole row tiles.
    padded = pl.cdiv(m, TILE_M) * TILE_M
    a_scale = jnp.pad(lhs_scale.astype(jnp.float32).T, ((0, 0), (0, padded - m)))
    interpret = _mgpu_interpret.params(interpret, reads_past_the_end=True)  # the last row tile
    body = functools.partial(_kernel, num_items=group_ids.shape[0], num_groups=g, cfg=config)
    body.__name__ = "vishwam_gmm_fp8_mgpu"
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype)),
        grid=(num_programs or (3 if interpret else _num_sms()),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )(group_ids, tile_ids, starts, ends, live, lhs, a_scale, rhs, rhs_scale.astype(jnp.float32))
