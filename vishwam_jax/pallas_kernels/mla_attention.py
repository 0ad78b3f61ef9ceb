"""Multi-head latent attention (DeepSeek-V3) kernels: decode on the latent cache, and prefill.

Decode (`mla_decode`, FlashMLA's semantics). The cache holds per token only [c_kv (512) ; k_pe (64)]
= 576 values, one latent "head" shared by every query head; the model absorbs W_UK into the query
(q = [q_nope W_UK (512) ; q_pe (64)]) and W_UV into the output, so

    out[b, i, h] = softmax_j(q[b, i, h] . cache[b, j] * scale) @ cache[b, j, :512]

over the visible cache positions j < lengths[b] - s_q + i + 1 (causal) or j < lengths[b].
`lengths[b]` counts the s_q new tokens, already written. A row with nothing visible returns zeros.

Paged cache: `cache` is [num_blocks, page (64), 576] and token t of row b lives at
cache[block_table[b, t // page], t % page]. Block-table entries past a row's length may hold anything
(ids are clipped into the pool; the pages they then point at get zero attention weight, though
the "xla" form needs them finite).

Prefill (`mla_prefill`): ordinary causal attention with q/k head dim 192 (128 nope + 64 rope) and
v head dim 128, differentiable (Pallas forward and backward on GPU).

Implementations (`implementation=`, or the environment variable VISHWAM_MLA_IMPL, which applies to
every call that leaves it at None / "auto"):
    "pallas_gpu"        Pallas kernel, Triton lowering (CUDA GPUs)          [auto on GPU]
    "pallas_tpu"        Pallas kernel, Mosaic lowering (decode only)        [auto on TPU]
    "pallas_interpret"  the GPU kernel run by the Pallas interpreter (any backend; for tests)
    "mosaic_gpu"        decode only: Pallas Mosaic GPU kernel (Hopper: TMA, wgmma, warp-specialised;
                        heads a multiple of 64, 576 = 512 + 64 channels, bf16/f16; other shapes raise)
                                                                            [auto decode on Hopper
                                                                             for those shapes]
    "mosaic_interpret"  the Mosaic GPU kernel run by jax's GPU interpreter (CPU; for tests)
    "cudnn"             prefill only: jax.nn.dot_product_attention(implementation="cudnn")
    "xla"               plain jnp einsums: bf16 matmuls, f32 softmax         [auto on CPU]
    "reference"         float32 jnp, materialised scores; the ground truth of the tests
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from vishwam_jax.pallas_kernels import _flash_prefill, _mla_gpu

IMPLEMENTATIONS = (
    "pallas_gpu",
    "pallas_tpu",
    "pallas_interpret",
    "mosaic_gpu",
    "mosaic_interpret",
    "cudnn",
    "xla",
    "reference",
)
ENV_VAR = "VISHWAM_MLA_IMPL"

__all__ = ["mla_decode", "mla_decode_reference", "mla_decode_xla", "mla_prefill", "mla_prefill_reference"]


def _platform() -> str:
    return jax.default_backend()


def _resolve(implementation: str | None) -> tuple[str, bool]:
    """(implementation, chosen automatically)."""
    if implementation in (None, "auto"):
        implementation = os.environ.get(ENV_VAR) or "auto"
    if implementation == "auto":
        return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(_platform(), "xla"), True
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown MLA implementation {implementation!r}; expected one of {IMPLEMENTATIONS} or 'auto'")
    return implementation, False


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------
def _gather_pages(cache: Float[Array, "nb page d"], block_table: Int[Array, "b mb"]) -> Float[Array, "b L d"]:
    nb, page, d = cache.shape
    batch, mb = block_table.shape
    return cache[jnp.clip(block_table, 0, nb - 1)].reshape(batch, mb * page, d)


def _visible(lengths: Int[Array, " b"], s_q: int, n_keys: int, causal: bool) -> Array:
    """[b, s_q, L] mask of the cache positions each new query sees."""
    if causal:
        limit = lengths[:, None] - s_q + jnp.arange(s_q)[None, :] + 1
    else:
        limit = jnp.broadcast_to(lengths[:, None], (lengths.shape[0], s_q))
    return jnp.arange(n_keys)[None, None, :] < limit[:, :, None]


def mla_decode_reference(
    q: Float[Array, "b s_q h d"],
    cache: Float[Array, "b L d"] | Float[Array, "nb page d"],
    lengths: Int[Array, " b"],
    *,
    softmax_scale: float,
    block_table: Int[Array, "b mb"] | None = None,
    v_head_dim: int = 512,
    causal: bool = True,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Float32, materialised scores; slots past a row's length are zeroed so stale garbage (even
    NaN) in the cache cannot reach the output."""
    del num_splits
    if block_table is not None:
        cache = _gather_pages(cache, block_table)
    s_q, n_keys = q.shape[1], cache.shape[1]
    qf, cf = q.astype(jnp.float32), cache.astype(jnp.float32)
    live = (jnp.arange(n_keys)[None, :] < lengths[:, None])[..., None]
    cf = jnp.where(live, cf, 0.0)
    s = jnp.einsum("bqhd,bld->bqhl", qf, cf, precision=jax.lax.Precision.HIGHEST) * softmax_scale
    s = jnp.where(_visible(lengths, s_q, n_keys, causal)[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bqhl,blv->bqhv", p, cf[..., :v_head_dim], precision=jax.lax.Precision.HIGHEST)
    o = (o / jnp.where(l == 0, 1.0, l)).astype(q.dtype)
    if return_lse:
        return o, jnp.where(l[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
    return o


def mla_decode_xla(
    q: Float[Array, "b s_q h d"],
    cache: Float[Array, "b L d"] | Float[Array, "nb page d"],
    lengths: Int[Array, " b"],
    *,
    softmax_scale: float,
    block_table: Int[Array, "b mb"] | None = None,
    v_head_dim: int = 512,
    causal: bool = True,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """The einsum form: matmuls in the input dtype with f32 accumulation, f32 softmax. Unlike the
    kernels it does not mask stale slots out of p @ v, so they must hold finite values."""
    del num_splits
    if block_table is not None:
        cache = _gather_pages(cache, block_table)
    s_q, n_keys = q.shape[1], cache.shape[1]
    cache = cache.astype(q.dtype)
    s = jnp.einsum("bqhd,bld->bqhl", q, cache, preferred_element_type=jnp.float32) * softmax_scale
    s = jnp.where(_visible(lengths, s_q, n_keys, causal)[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bqhl,blv->bqhv", p.astype(q.dtype), cache[..., :v_head_dim], preferred_element_type=jnp.float32)
    l_safe = jnp.where(l == 0, 1.0, l)
    o = (o / l_safe[..., None]).astype(q.dtype)
    if return_lse:
        return o, jnp.where(l == 0, -jnp.inf, m[..., 0] + jnp.log(l_safe))
    return o


def _check_decode_args(q, cache, lengths, block_table, v_head_dim: int) -> None:
    """Name the problem before any einsum or kernel trips over it."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, s_q, heads, channels], got shape {q.shape}")
    batch, _, _, d = q.shape
    if cache.ndim != 3:
        raise ValueError(f"cache must be [batch, slots, channels] or [num_blocks, page, channels], got {cache.shape}")
    if cache.shape[-1] != d:
        raise ValueError(f"q has {d} channels per head but the cache {cache.shape[-1]}")
    if not 0 < v_head_dim <= d:
        raise ValueError(
            f"v_head_dim={v_head_dim} must be in 1..{d} (the value is the cache's first v_head_dim channels)"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got shape {lengths.shape}")
    if block_table is None:
        if cache.shape[0] != batch:
            raise ValueError(
                f"contiguous cache has {cache.shape[0]} rows for a batch of {batch} (paged? pass block_table)"
            )
    elif block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [batch={batch}, max_blocks], got shape {block_table.shape}")
    for name, x in (("lengths", lengths), ("block_table", block_table)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got {x.dtype}")


# Below this many contiguous-cache bytes per call the Triton kernel's fixed cost (~22-25 µs on an
# H100, whatever the split count: docs/bench_mla.md) exceeds XLA's einsums: 4.7-38 MB caches ran
# 13-19 µs in XLA against 25-54 µs in the kernel, 75 MB and up ran faster in the kernel.
XLA_BELOW_CACHE_BYTES = 48 << 20


XLA_MAX_QUERIES = 4  # decode and speculative verification; a prefill chunk's [s_q, h, L] scores would not fit


def _xla_faster(cache, block_table, s_q: int = 1) -> bool:
    """Auto mode on GPU: decoding over a small contiguous cache goes to the einsum form (a paged one
    would first be gathered into a copy, and a long chunk would materialise its scores: the kernel)."""
    return block_table is None and s_q <= XLA_MAX_QUERIES and cache.size * cache.dtype.itemsize <= XLA_BELOW_CACHE_BYTES


def _mosaic_faster(q, cache, v_head_dim: int) -> bool:
    """Auto mode on a Hopper GPU: the Mosaic GPU kernel for every shape it takes. On an H100 it ran
    1.43-1.57x the Triton kernel's rate on each compute-bound 128-head row measured (BENCHMARKS.md);
    wgmma is Hopper's alone, so other GPUs keep the Triton kernel."""
    from vishwam_jax.pallas_kernels import _mla_mgpu

    device = jax.devices()[0]
    hopper = device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"
    return hopper and _mla_mgpu.supported(q.shape, cache.shape, q.dtype, v_head_dim=v_head_dim)


def _triton_shapes_ok(d: int, v_head_dim: int) -> bool:
    dr = d - v_head_dim
    pow2 = lambda n: n >= 16 and not n & (n - 1)  # noqa: E731
    return pow2(v_head_dim) and (dr == 0 or pow2(dr))


def _gpu_config(q, cache, block_table) -> dict:
    """The Triton kernel's tiles and split count for this call; the Mosaic kernel uses the same split count."""
    max_len = block_table.shape[1] * cache.shape[1] if block_table is not None else cache.shape[1]
    return _mla_gpu.default_config(q.shape[1] * q.shape[2], q.shape[0], max_len, block_table is not None)


def mla_decode(
    q: Float[Array, "b s_q h 576"],
    cache: Float[Array, "b L 576"] | Float[Array, "num_blocks 64 576"],
    lengths: Int[Array, " b"],
    *,
    softmax_scale: float,
    block_table: Int[Array, "b max_blocks"] | None = None,
    v_head_dim: int = 512,
    causal: bool = True,
    num_splits: int | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
) -> Float[Array, "b s_q h 512"] | tuple[Float[Array, "b s_q h 512"], Float[Array, "b s_q h"]]:
    """Attention of absorbed MLA queries over the latent cache (see the module docstring).

    num_splits: KV splits per batch row (flash-decoding); None picks from batch x heads vs the
      number of SMs. return_lse: also return the float32 natural-log log-sum-exp of the scaled
      scores, [b, s_q, h] (-inf for a row with nothing visible).
    """
    impl, auto = _resolve(implementation)
    if impl == "cudnn":
        raise ValueError("the cuDNN implementation is for mla_prefill only")
    _check_decode_args(q, cache, lengths, block_table, v_head_dim)
    if (
        auto
        and impl == "pallas_gpu"
        and (not _triton_shapes_ok(q.shape[-1], v_head_dim) or _xla_faster(cache, block_table, q.shape[1]))
    ):
        impl = "xla"
    elif auto and impl == "pallas_gpu" and _mosaic_faster(q, cache, v_head_dim):
        impl = "mosaic_gpu"
    kwargs = dict(softmax_scale=softmax_scale, block_table=block_table, v_head_dim=v_head_dim, causal=causal)
    if impl == "reference":
        return mla_decode_reference(q, cache, lengths, return_lse=return_lse, **kwargs)
    if impl == "xla":
        return mla_decode_xla(q, cache, lengths, return_lse=return_lse, **kwargs)
    lengths = lengths.astype(jnp.int32)
    if block_table is not None:
        # in range whatever the caller's unused entries hold (a paged cache marks them with an
        # out-of-range id): a query padded past its row's pages may then read another page's
        # finite values, which its mask discards, but never memory outside the pool
        block_table = jnp.clip(block_table.astype(jnp.int32), 0, cache.shape[0] - 1)
    operands = (q, cache, lengths, block_table)
    kernel_kwargs = dict(softmax_scale=float(softmax_scale), v_head_dim=v_head_dim, causal=causal)
    if impl == "pallas_tpu":
        from vishwam_jax.pallas_kernels import _mla_tpu  # Mosaic imports only where used

        o, lse = _mla_tpu.mla_decode_tpu(*operands, num_splits=num_splits or 1, **kernel_kwargs)
    elif impl in ("mosaic_gpu", "mosaic_interpret"):
        from vishwam_jax.pallas_kernels import _mla_mgpu  # Mosaic GPU imports only where used

        splits = int(num_splits or _gpu_config(q, cache, block_table)["num_splits"])
        o, lse = _mla_mgpu.mla_decode_mgpu(
            *operands, num_splits=splits, interpret=impl == "mosaic_interpret", **kernel_kwargs
        )
    else:
        cfg = _gpu_config(q, cache, block_table)
        if num_splits is not None:
            cfg["num_splits"] = int(num_splits)
        if block_table is not None:
            cfg["block_k"] = min(cfg["block_k"], cache.shape[1])
        o, lse = _mla_gpu.mla_decode_gpu(*operands, interpret=impl == "pallas_interpret", **kernel_kwargs, **cfg)
    return (o, lse) if return_lse else o


# ------------------------------------------------------------------------------------------------
# prefill
# ------------------------------------------------------------------------------------------------
def mla_prefill_reference(
    q: Float[Array, "b t h dqk"],
    k: Float[Array, "b t h dqk"],
    v: Float[Array, "b t h dv"],
    *,
    softmax_scale: float,
    causal: bool = True,
) -> Float[Array, "b t h dv"]:
    """Float32, materialised [b, h, t, t] scores."""
    t = q.shape[1]
    s = (
        jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        * softmax_scale
    )
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bkhv->bqhv", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return o.astype(q.dtype)


def _prefill_xla(q, k, v, *, softmax_scale, causal):
    t = q.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * softmax_scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhv->bqhv", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


# What `auto` runs for prefill on a GPU: measured per shape class in docs/bench_mla.md.
GPU_PREFILL_AUTO = "cudnn"


def _cudnn_prefill_native(q, k, v, *, softmax_scale, causal):
    """cuDNN's own MLA support (q/k head dim != v head dim; cuDNN >= 9.10 on Hopper). jax.nn's
    wrapper insists on equal head dims, so this goes through jax's cuDNN module directly."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    return fa.dot_product_attention(q, k, v, scale=softmax_scale, mask_type=mask)


def _cudnn_prefill_padded(q, k, v, *, softmax_scale, causal):
    """The public jax.nn cuDNN path, v zero-padded to the q/k head dim (1.2x the flops at 192/128)."""
    dv = v.shape[-1]
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv)))
    o = jax.nn.dot_product_attention(q, k, vp, scale=softmax_scale, is_causal=causal, implementation="cudnn")
    return o[..., :dv]


def _cudnn_prefill(q, k, v, *, softmax_scale, causal):
    try:
        return _cudnn_prefill_native(q, k, v, softmax_scale=softmax_scale, causal=causal)
    except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError):
        return _cudnn_prefill_padded(q, k, v, softmax_scale=softmax_scale, causal=causal)


def mla_prefill(
    q: Float[Array, "b t h 192"],
    k: Float[Array, "b t h 192"],
    v: Float[Array, "b t h 128"],
    *,
    softmax_scale: float,
    causal: bool = True,
    implementation: str | None = None,
    config: tuple | None = None,
) -> Float[Array, "b t h 128"]:
    """Self-attention over one chunk of t tokens (naive MLA form: per-head k, v materialised).
    Differentiable on every implementation; `config` overrides the Pallas block shapes."""
    impl, auto = _resolve(implementation)
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"mla_prefill needs q, k [b, t, h, d] of one shape and v [b, t, h, dv], got {q.shape}, {k.shape}, {v.shape}"
        )
    kwargs = dict(softmax_scale=softmax_scale, causal=causal)
    if impl in ("mosaic_gpu", "mosaic_interpret"):
        raise ValueError(f"the {impl!r} implementation is for mla_decode only")
    if impl == "reference":
        return mla_prefill_reference(q, k, v, **kwargs)
    if impl == "pallas_tpu":
        if not auto:
            raise NotImplementedError("no Pallas TPU prefill kernel; use 'xla' on TPU")
        impl = "xla"
    if impl == "pallas_gpu" and auto:
        impl = GPU_PREFILL_AUTO
        if impl == "pallas_gpu":
            try:
                _flash_prefill.split_head_dim(q.shape[-1])
            except ValueError:
                impl = "xla"
    if impl == "cudnn":
        if auto:
            try:
                return _cudnn_prefill(q, k, v, **kwargs)
            except Exception:  # noqa: BLE001 - cuDNN rejects some shapes/dtypes (f32, odd head dims)
                return _flash_prefill.flash_prefill(
                    q, k, v, float(softmax_scale), causal, False, config or _flash_prefill.DEFAULT_CONFIG
                )
        return _cudnn_prefill(q, k, v, **kwargs)
    if impl == "xla":
        return _prefill_xla(q, k, v, **kwargs)
    return _flash_prefill.flash_prefill(
        q, k, v, float(softmax_scale), causal, impl == "pallas_interpret", config or _flash_prefill.DEFAULT_CONFIG
    )
