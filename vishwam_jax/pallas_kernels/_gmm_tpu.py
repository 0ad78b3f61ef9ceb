"""Pallas TPU (Mosaic) grouped matmul, megablox-style, sharing the work-item metadata of the GPU kernel.

The TPU grid runs sequentially per core, so the visits of one row tile (one per group it touches)
are consecutive grid steps over the same output block: each visit merges its rows into the block
with a masked select and the block is written back once the tile changes. Unlike
`jax.experimental.pallas.ops.tpu.megablox` this kernel takes int8 weights with per-output-channel
scales (applied to the float32 accumulator, which equals dequantising every tile) and zeroes the
rows past sum(group_sizes) through the padding group. The weight gradient uses megablox's tgmm.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels._gmm_gpu import make_work_items


def _pick_tile(dim: int, preferred: tuple[int, ...]) -> int:
    """Largest preferred tile dividing `dim`; the whole dimension when none does (always legal)."""
    for t in preferred:
        if dim % t == 0:
            return t
    return dim


def _gmm_kernel(
    group_ids_ref,
    tile_ids_ref,
    starts_ref,
    ends_ref,
    num_items_ref,  # scalar prefetch (SMEM)
    lhs_ref,
    rhs_ref,
    *rest,
    num_groups: int,
    tm: int,
    tn: int,
    transpose_rhs: bool,
    has_scale: bool,
    compute_dtype,
):
    if has_scale:
        scale_ref, out_ref, acc_ref = rest
    else:
        out_ref, acc_ref = rest
    item, k_step = pl.program_id(1), pl.program_id(2)
    group = group_ids_ref[item]
    is_real = group < num_groups

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_real)
    def _accumulate():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(
            lhs_ref[...].astype(compute_dtype),
            rhs_ref[...].astype(compute_dtype),
            dims,
            preferred_element_type=jnp.float32,
        )

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _store():
        acc = acc_ref[...]
        if has_scale:
            acc = acc * scale_ref[...].astype(jnp.float32)
        rows = tile_ids_ref[item] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        mine = (rows >= starts_ref[group]) & (rows < ends_ref[group])
        # Padding-group visits (is_real False) left acc at zero: that is what they store.
        out_ref[...] = jnp.where(mine, acc, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm(
    lhs: Float[Array, "m k"],
    rhs: Array,  # [g, k, n] or [g, n, k]; float or int8
    group_sizes: Int[Array, " g"],
    *,
    transpose_rhs: bool = False,
    rhs_scale: Float[Array, "g n"] | None = None,
    out_dtype=None,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tm, tk, tn = tiling or (128, _pick_tile(k, (512, 256, 128)), _pick_tile(n, (512, 256, 128)))
    m_pad = pl.cdiv(m, tm) * tm
    if m_pad != m:  # the padding group absorbs the extra rows; they are sliced off below
        lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    compute_dtype = lhs.dtype if jnp.issubdtype(rhs.dtype, jnp.integer) else jnp.promote_types(lhs.dtype, rhs.dtype)
    group_ids, tile_ids, starts, ends, num_items = make_work_items(group_sizes, m_pad, tm)

    def lhs_map(n_i, item, k_i, group_ids, tile_ids, *_):
        return tile_ids[item], k_i

    def rhs_map(n_i, item, k_i, group_ids, *_):
        group = jnp.minimum(group_ids[item], g - 1)  # padding-group visits load (and ignore) a real block
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def scale_map(n_i, item, k_i, group_ids, *_):
        return jnp.minimum(group_ids[item], g - 1), 0, n_i

    def out_map(n_i, item, k_i, group_ids, tile_ids, *_):
        return tile_ids[item], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_specs = [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)]
    operands = [lhs, rhs]
    if rhs_scale is not None:
        in_specs.append(pl.BlockSpec((None, 1, tn), scale_map))
        operands.append(rhs_scale.astype(jnp.float32).reshape(g, 1, n))
    kernel = functools.partial(
        _gmm_kernel,
        num_groups=g,
        tm=tm,
        tn=tn,
        transpose_rhs=transpose_rhs,
        has_scale=rhs_scale is not None,
        compute_dtype=compute_dtype,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            grid=(n // tn, num_items[0], k // tk),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="vishwam_gmm_tpu",
    )(group_ids, tile_ids, starts, ends, num_items, *operands)
    return out[:m]


def tgmm(
    lhs: Float[Array, "m k"],
    grad: Float[Array, "m n"],
    group_sizes: Int[Array, " g"],
    *,
    out_dtype=None,
    interpret: bool = False,
) -> Float[Array, "g k n"]:
    # The megablox package re-exports its `gmm` function under the submodule's name.
    megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

    m, k = lhs.shape
    n = grad.shape[1]
    tm = 128
    m_pad = pl.cdiv(m, tm) * tm
    if m_pad != m:
        lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
        grad = jnp.pad(grad, ((0, m_pad - m), (0, 0)))
    # megablox.tgmm ignores rows past sum(group_sizes); clip so the sum never exceeds m.
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
    tiling = (tm, _pick_tile(k, (512, 256, 128)), _pick_tile(n, (512, 256, 128)))
    return megablox.tgmm(
        lhs.swapaxes(0, 1), grad, sizes, jnp.dtype(out_dtype or lhs.dtype), tiling, interpret=interpret
    )
