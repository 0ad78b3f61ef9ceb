"""MLA prefill / training attention: a FlashAttention-2 kernel in Pallas (Triton lowering) for
query/key head dim 192 (128 nope + 64 rope) and value head dim 128, with a Pallas backward.

Forward: one program per (query block, head, batch row); online softmax over key blocks; the key
blocks strictly below the causal diagonal run without any mask (the common case), only the
diagonal / ragged-tail blocks pay for masking. The log-sum-exp (log2 domain) is kept for backward.

Backward (FlashAttention-2): delta = rowsum(o * do) in XLA, then two Pallas kernels that recompute
p = exp2(s - lse): one per key block accumulating dk, dv over the query blocks that see it, one per
query block accumulating dq. No atomics, no [t, t] intermediate.

Triton tensors need power-of-two sizes, so a head dim such as 192 is handled as two slices
(128 + 64) contracted by two dots; sequence lengths need not be multiples of the blocks (the ragged
tail is masked on load and in the scores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from vishwam_jax.pallas_kernels._mla_gpu import LOG2E, _nn_dot, _nt_dot, plgpu


def _tn_dot(a, b):
    """a.T @ b with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def split_head_dim(d: int) -> tuple[int, int]:
    """d = a + b with a the largest power of two <= d and b a power of two or 0 (192 = 128 + 64)."""
    a = 1 << (d.bit_length() - 1)
    b = d - a
    if b & (b - 1) or (b and b < 16) or a < 16:
        raise ValueError(f"head dim {d} is not a power of two >= 16 plus 0 or a power of two >= 16")
    return a, b


def _load_qk(ref, b, start, size, h, da, db, mask):
    """The two power-of-two slices of rows [start, start + size) of head h."""
    if mask is None:
        xa = ref[b, pl.ds(start, size), h, pl.ds(0, da)]
        xb = ref[b, pl.ds(start, size), h, pl.ds(da, db)] if db else None
    else:
        xa = plgpu.load(ref.at[b, pl.ds(start, size), h, pl.ds(0, da)], mask=mask, other=0)
        xb = plgpu.load(ref.at[b, pl.ds(start, size), h, pl.ds(da, db)], mask=mask, other=0) if db else None
    return xa, xb


def _scores(qa, qb, ka, kb):
    s = _nt_dot(qa, ka)
    if qb is not None:
        s = s + _nt_dot(qb, kb)
    return s


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, t, bq, bk, da, db, dvv, scale_log2, causal):
    qi = pl.num_programs(0) - 1 - pl.program_id(0)  # the longest (causal) query blocks start first
    h, b = pl.program_id(1), pl.program_id(2)
    q0 = qi * bq
    rows = q0 + jnp.arange(bq, dtype=jnp.int32)
    row_ok = (rows < t)[:, None]
    qa, qb = _load_qk(q_ref, b, q0, bq, h, da, db, row_ok)

    def step(j, carry, masked):
        acc, m, l = carry
        k0 = j * bk
        cols = k0 + jnp.arange(bk, dtype=jnp.int32)
        col_ok = (cols < t)[:, None] if masked else None
        ka, kb = _load_qk(k_ref, b, k0, bk, h, da, db, col_ok)
        if masked:
            v = plgpu.load(v_ref.at[b, pl.ds(k0, bk), h, :], mask=col_ok, other=0)
        else:
            v = v_ref[b, pl.ds(k0, bk), h, :]
        s = _scores(qa, qb, ka, kb) * scale_log2
        if masked:
            vis = cols[None, :] < t
            if causal:
                vis = vis & (cols[None, :] <= rows[:, None])
            s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _nn_dot(p.astype(v.dtype), v)
        return acc, m_new, l

    hi = jnp.minimum(t, q0 + bq) if causal else t
    n_full = q0 // bk if causal else t // bk  # key blocks needing no mask at all
    carry = (jnp.zeros((bq, dvv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = jax.lax.fori_loop(n_full, pl.cdiv(hi, bk), functools.partial(step, masked=True), carry)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    plgpu.store(o_ref.at[b, pl.ds(q0, bq), h, :], (acc / l_safe[:, None]).astype(o_ref.dtype), mask=row_ok)
    plgpu.store(lse_ref.at[b, h, pl.ds(q0, bq)], m + jnp.log2(l_safe), mask=rows < t)


def _bwd_dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    t,
    bq,
    bk,
    da,
    db,
    dvv,
    scale_log2,
    scale,
    causal,
):
    kj, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0 = kj * bk
    cols = k0 + jnp.arange(bk, dtype=jnp.int32)
    col_ok = (cols < t)[:, None]
    ka, kb = _load_qk(k_ref, b, k0, bk, h, da, db, col_ok)
    v = plgpu.load(v_ref.at[b, pl.ds(k0, bk), h, :], mask=col_ok, other=0)

    def step(i, carry, masked):
        dka, dkb, dv = carry
        q0 = i * bq
        rows = q0 + jnp.arange(bq, dtype=jnp.int32)
        row_ok = rows < t
        # padded query rows load as zeros (q, do, lse, delta), which makes their ds exactly 0
        qa, qb = _load_qk(q_ref, b, q0, bq, h, da, db, row_ok[:, None])
        do = plgpu.load(do_ref.at[b, pl.ds(q0, bq), h, :], mask=row_ok[:, None], other=0)
        lse = plgpu.load(lse_ref.at[b, h, pl.ds(q0, bq)], mask=row_ok, other=0.0)
        delta = plgpu.load(delta_ref.at[b, h, pl.ds(q0, bq)], mask=row_ok, other=0.0)
        p = jnp.exp2(_scores(qa, qb, ka, kb) * scale_log2 - lse[:, None])
        if masked:
            p = jnp.where(cols[None, :] <= rows[:, None], p, 0.0)
        dv = dv + _tn_dot(p.astype(do.dtype), do)
        ds = (p * (_nt_dot(do, v) - delta[:, None])).astype(qa.dtype)
        dka = dka + _tn_dot(ds, qa)
        if qb is not None:
            dkb = dkb + _tn_dot(ds, qb)
        return dka, dkb, dv

    nq = pl.cdiv(t, bq)
    carry = (
        jnp.zeros((bk, da), jnp.float32),
        jnp.zeros((bk, max(db, 16)), jnp.float32),
        jnp.zeros((bk, dvv), jnp.float32),
    )
    if causal:
        first = k0 // bq
        diag_end = jnp.minimum(pl.cdiv(k0 + bk, bq), nq)
        carry = jax.lax.fori_loop(first, diag_end, functools.partial(step, masked=True), carry)
        carry = jax.lax.fori_loop(diag_end, nq, functools.partial(step, masked=False), carry)
    else:
        carry = jax.lax.fori_loop(0, nq, functools.partial(step, masked=False), carry)
    dka, dkb, dv = carry
    plgpu.store(dk_ref.at[b, pl.ds(k0, bk), h, pl.ds(0, da)], (dka * scale).astype(dk_ref.dtype), mask=col_ok)
    if db:
        plgpu.store(dk_ref.at[b, pl.ds(k0, bk), h, pl.ds(da, db)], (dkb * scale).astype(dk_ref.dtype), mask=col_ok)
    plgpu.store(dv_ref.at[b, pl.ds(k0, bk), h, :], dv.astype(dv_ref.dtype), mask=col_ok)


def _bwd_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, t, bq, bk, da, db, dvv, scale_log2, scale, causal
):
    qi = pl.num_programs(0) - 1 - pl.program_id(0)
    h, b = pl.program_id(1), pl.program_id(2)
    q0 = qi * bq
    rows = q0 + jnp.arange(bq, dtype=jnp.int32)
    row_ok = rows < t
    qa, qb = _load_qk(q_ref, b, q0, bq, h, da, db, row_ok[:, None])
    do = plgpu.load(do_ref.at[b, pl.ds(q0, bq), h, :], mask=row_ok[:, None], other=0)
    lse = plgpu.load(lse_ref.at[b, h, pl.ds(q0, bq)], mask=row_ok, other=0.0)
    delta = plgpu.load(delta_ref.at[b, h, pl.ds(q0, bq)], mask=row_ok, other=0.0)

    def step(j, carry, masked):
        dqa, dqb = carry
        k0 = j * bk
        cols = k0 + jnp.arange(bk, dtype=jnp.int32)
        col_ok = (cols < t)[:, None] if masked else None
        ka, kb = _load_qk(k_ref, b, k0, bk, h, da, db, col_ok)
        if masked:
            v = plgpu.load(v_ref.at[b, pl.ds(k0, bk), h, :], mask=col_ok, other=0)
        else:
            v = v_ref[b, pl.ds(k0, bk), h, :]
        p = jnp.exp2(_scores(qa, qb, ka, kb) * scale_log2 - lse[:, None])
        if masked:
            vis = cols[None, :] < t
            if causal:
                vis = vis & (cols[None, :] <= rows[:, None])
            p = jnp.where(vis, p, 0.0)
        ds = (p * (_nt_dot(do, v) - delta[:, None])).astype(ka.dtype)
        dqa = dqa + _nn_dot(ds, ka)
        if kb is not None:
            dqb = dqb + _nn_dot(ds, kb)
        return dqa, dqb

    hi = jnp.minimum(t, q0 + bq) if causal else t
    n_full = q0 // bk if causal else t // bk
    carry = (jnp.zeros((bq, da), jnp.float32), jnp.zeros((bq, max(db, 16)), jnp.float32))
    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    dqa, dqb = jax.lax.fori_loop(n_full, pl.cdiv(hi, bk), functools.partial(step, masked=True), carry)
    plgpu.store(dq_ref.at[b, pl.ds(q0, bq), h, pl.ds(0, da)], (dqa * scale).astype(dq_ref.dtype), mask=row_ok[:, None])
    if db:
        plgpu.store(
            dq_ref.at[b, pl.ds(q0, bq), h, pl.ds(da, db)], (dqb * scale).astype(dq_ref.dtype), mask=row_ok[:, None]
        )


# (fwd: block_q, block_k, warps, stages), (dkv: block_q, block_k, warps, stages), (dq: ...): H100-tuned
DEFAULT_CONFIG = ((128, 64, 8, 3), (32, 64, 4, 2), (64, 32, 4, 2))


def _fwd(q, k, v, scale, causal, interpret, config):
    batch, t, n_heads, d = q.shape
    dvv = v.shape[-1]
    da, db = split_head_dim(d)
    bq, bk, warps, stages = config[0]
    kernel = functools.partial(
        _fwd_kernel, t=t, bq=bq, bk=bk, da=da, db=db, dvv=dvv, scale_log2=scale * LOG2E, causal=causal
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, bq), n_heads, batch),
        out_shape=(
            jax.ShapeDtypeStruct((batch, t, n_heads, dvv), q.dtype),
            jax.ShapeDtypeStruct((batch, n_heads, t), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="mla_prefill_fwd",
    )(q, k, v)


def _bwd(q, k, v, o, lse, do, scale, causal, interpret, config):
    batch, t, n_heads, d = q.shape
    dvv = v.shape[-1]
    da, db = split_head_dim(d)
    delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(t=t, da=da, db=db, dvv=dvv, scale_log2=scale * LOG2E, scale=scale, causal=causal)
    bq, bk, warps, stages = config[1]
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, bq=bq, bk=bk, **common),
        grid=(pl.cdiv(t, bk), n_heads, batch),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="mla_prefill_bwd_dkv",
    )(q, k, v, do, lse, delta)
    bq, bk, warps, stages = config[2]
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, bq=bq, bk=bk, **common),
        grid=(pl.cdiv(t, bq), n_heads, batch),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="mla_prefill_bwd_dq",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def flash_prefill(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t h d"],
    v: Float[Array, "b t h dv"],
    scale: float,
    causal: bool,
    interpret: bool,
    config: tuple,
) -> Float[Array, "b t h dv"]:
    return _fwd(q, k, v, scale, causal, interpret, config)[0]


def _flash_prefill_fwd(q, k, v, scale, causal, interpret, config):
    o, lse = _fwd(q, k, v, scale, causal, interpret, config)
    return o, (q, k, v, o, lse)


def _flash_prefill_bwd(scale, causal, interpret, config, res, do):
    q, k, v, o, lse = res
    return _bwd(q, k, v, o, lse, do, scale, causal, interpret, config)


flash_prefill.defvjp(_flash_prefill_fwd, _flash_prefill_bwd)
