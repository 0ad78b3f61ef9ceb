"""Expert parallelism for the shared MoE dispatch (models/moe.py::dispatch_experts).

The experts are split evenly over the mesh's `expert` axis (device i holds experts
[i*E/ep, (i+1)*E/ep)); tokens are split over the batch axes, `expert` included. Inside `shard_map`
each device, for its own tokens:

  1. sorts its (token, expert) pairs by expert, so the rows bound for each device are contiguous;
  2. exchanges per-expert counts (all_gather of E ints: negligible) so every device knows every
     block size without a data-dependent shape;
  3. sends each block to its experts' device with an all-to-all;
  4. runs the gated MLP of its local experts over what it received with the grouped matmul;
  5. sends the results back with the reverse all-to-all, where they land in the sorted order of
     step 1, and combines the k results of each token with its gates.

Capacity-free by default: the receive buffer holds every row any source could send, so no routing
skew drops a token. A token's k experts are distinct (top-k), so it sends at most min(k, E/ep) rows
to one device: each source's block is n_local * min(k, E/ep) rows (half the naive n_local * k for
Grok-1 on 8 devices or DeepSeek-V3 on 64). Two exchanges:
  ragged  jax.lax.ragged_all_to_all: only the routed rows travel (the default on TPU);
  dense   jax.lax.all_to_all of [expert, slot, d] buffers: padding travels too (ep× the bytes of
          ragged when capacity-free), but every backend runs it (XLA:CPU has no ragged all-to-all),
          and on GPUs NCCL's all-to-all measured faster than XLA's ragged kernel (the GPU default).
A capacity factor c bounds each (source, destination) slot to ceil(c * n_local * k / ep) rows; rows
past it are dropped (their expert contributes 0), which trades exactness for memory.

If the MoE width is sharded over `tensor` (rule `expert_mlp`), every tensor shard computes a partial
down-projection and the combined output is summed over `tensor` at the end, on the smallest array.
With no expert axis but a sharded width (Grok-1 served tensor-parallel), `dispatch_experts_width_parallel`
does only that: each device runs the local dispatch on its width shard of every expert and the
outputs are summed. Either way the grouped matmul, a Pallas kernel XLA cannot partition, sees only
per-device blocks; left to GSPMD, its sharded weights would be all-gathered on every call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from vishwam_jax.quantization import QuantizedWeight
from vishwam_jax.sharding.context import ActiveMesh, shard_map
from vishwam_jax.sharding.mesh import AXES, mesh_sizes
from vishwam_jax.sharding.rules import ShardingError


def _exchange_method(active: ActiveMesh) -> str:
    """The exchange of `moe_all_to_all`; "auto" is ragged on TPU only. XLA:CPU has no ragged all-to-all, and on
    GPUs (2 x H200, jax 0.11.2, DeepSeek-V3 8 layers, docs/bench_big_models.md) the dense exchange over NCCL ran the
    step 4-5x faster in prefill (20,743 against 5,113 tok/s at 1K tokens) and 19% faster in decode
    at batch 64, despite moving the padding: XLA's ragged kernel took ~0.4 ms for 7 MB."""
    if active.moe_all_to_all != "auto":
        return active.moe_all_to_all
    platform = active.mesh.devices.flat[0].platform
    return "ragged" if platform == "tpu" and hasattr(jax.lax, "ragged_all_to_all") else "dense"


def _token_axes(active: ActiveMesh, exclude: tuple[str, ...]) -> tuple[str, ...]:
    """Mesh axes splitting the tokens: the rules' batch axes plus `expert` (so the all-to-all moves
    distinct tokens), never an axis that splits the MoE width (tokens must be whole there)."""
    sizes = mesh_sizes(active.mesh)
    wanted = set(active.rules.activations.get("batch", ())) | {"expert"}
    return tuple(a for a in AXES if a in wanted and sizes.get(a, 1) > 1 and a not in exclude)


def _width_axes(active: ActiveMesh, f: int) -> tuple[str, ...]:
    """Mesh axes splitting each expert's hidden width f, from the `expert_mlp` parameter rule (never
    an axis that splits the tokens: a token's row must be whole on every width shard)."""
    sizes = mesh_sizes(active.mesh)
    batch = set(active.rules.activations.get("batch", ())) | {"expert"}
    axes = tuple(a for a in active.rules.params.get("expert_mlp", ()) if sizes.get(a, 1) > 1 and a not in batch)
    return axes if axes and f % math.prod(sizes[a] for a in axes) == 0 else ()


# The layout of the expert weights the dispatch takes ({"gate", "up", "down"}, each an array or a
# QuantizedWeight, whose scale has the same leading dimensions: an int8 scale the weight's, with size 1
# on `embed` resp. `expert_mlp` contracted; an fp8 scale [e, row blocks, column blocks]; quantized
# values and scales are stored K-major, the last two swapped, `_stored_axes`): the logical
# names models/moe.py's Experts gives its Params. The
# shard_map blocks below split the `experts` dimension over `expert` and `expert_mlp` over the width
# axes; `embed` stays whole inside (an fsdp-sharded embed is gathered on the way in, as FSDP does).
WEIGHT_AXES = {
    "gate": ("experts", "embed", "expert_mlp"),
    "up": ("experts", "embed", "expert_mlp"),
    "down": ("experts", "expert_mlp", "embed"),
}


def _weight_spec(
    leaf_shape: tuple[int, ...], axes: tuple[str, ...], width_axes: tuple[str, ...], expert_axis: str | None = "expert"
) -> PartitionSpec:
    spec: list[Any] = [None] * len(leaf_shape)
    spec[axes.index("experts")] = expert_axis
    f_dim = axes.index("expert_mlp")
    if width_axes and leaf_shape[f_dim] > 1:  # an int8 scale has size 1 on contracted axes (kept whole)
        spec[f_dim] = width_axes[0] if len(width_axes) == 1 else width_axes
    return PartitionSpec(*spec)


def _stored_axes(name: str, weight: Any) -> tuple[str, ...]:
    """The logical axes of one expert weight as stored: WEIGHT_AXES, the last two swapped for K-major
    quantized values (and their scales, which are laid out like them)."""
    axes = WEIGHT_AXES[name]
    if isinstance(weight, QuantizedWeight) and weight.k_major:
        return (*axes[:-2], axes[-1], axes[-2])
    return axes


def _weight_specs(expert_params: dict, width_axes: tuple[str, ...], expert_axis: str | None) -> dict:
    """PartitionSpecs of the gate/up ([e, d, f]) and down ([e, f, d]) leaves, quantized ones' scales included."""
    return {
        name: jax.tree_util.tree_map(
            lambda w, axes=_stored_axes(name, expert_params[name]): _weight_spec(
                w.shape, axes, width_axes, expert_axis
            ),
            expert_params[name],
        )
        for name in WEIGHT_AXES
    }


def expert_width(expert_params: dict) -> int:
    """The hidden width f of every expert (read off the down projection, possibly quantized)."""
    down = expert_params["down"]
    return down.shape[_stored_axes("down", down).index("expert_mlp")]


def width_axes(active: ActiveMesh, expert_params: dict) -> tuple[str, ...]:
    axes = _width_axes(active, expert_width(expert_params))
    down = expert_params["down"]
    if axes and isinstance(down, QuantizedWeight) and down.format == "fp8":
        # Each width shard dequantizes its own columns with its own blocks: a shard must hold whole blocks.
        shard = expert_width(expert_params) // math.prod(mesh_sizes(active.mesh)[a] for a in axes)
        if shard % down.block[0] or shard % down.block[1]:
            raise ValueError(
                f"expert width shards of {shard} columns ({'x'.join(axes)}) split fp8 blocks of {down.block}; "
                "use a mesh whose width split keeps whole blocks"
            )
    return axes


def dispatch_experts_width_parallel(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    expert_params: dict,
    local_dispatch: Callable,
    active: ActiveMesh,
) -> Float[Array, "n d"]:
    """`local_dispatch(x, gates, experts, params) -> float32 [n, d]` on each device's width shard of
    every expert (all experts on every device), summed over the width axes. Tokens stay split over
    the batch axes that divide them (replicated otherwise: a decode batch of 1)."""
    mesh = active.mesh
    sizes = mesh_sizes(mesh)
    axes = width_axes(active, expert_params)
    token_axes = _token_axes(active, axes)
    if x.shape[0] % math.prod(sizes[a] for a in token_axes):
        token_axes = ()
    tok = PartitionSpec(token_axes if token_axes else None)
    specs = _weight_specs(expert_params, axes, expert_axis=None)
    params = {name: expert_params[name] for name in specs}

    def body(x, gates, experts, params):
        return jax.lax.psum(local_dispatch(x, gates, experts, params), axes)

    return shard_map(body, mesh, in_specs=(tok, tok, tok, specs), out_specs=tok)(x, gates, experts, params)


def _exclusive_cumsum(x: Int[Array, "... n"]) -> Int[Array, "... n"]:
    return jnp.cumsum(x, axis=-1) - x


def dispatch_experts_parallel(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    expert_params: dict,
    activation: str,
    num_experts: int,
    active: ActiveMesh,
) -> tuple[Float[Array, "n d"], Int[Array, " e"]]:
    """`dispatch_experts` with the experts split over the active mesh's expert axis (same result)."""
    mesh = active.mesh
    sizes = mesh_sizes(mesh)
    ep = sizes["expert"]
    if num_experts % ep:
        raise ShardingError(
            f"expert={ep} does not divide num_experts={num_experts} (expert parallelism splits the experts evenly)"
        )
    n, d = x.shape
    k = experts.shape[1]
    axes = width_axes(active, expert_params)
    token_axes = _token_axes(active, axes)
    shards = math.prod(sizes[a] for a in token_axes)

    # Pad the tokens to a multiple of the token shards; the pad rows have gate 0 and are spread over
    # the experts round-robin so they do not pile onto one device.
    pad = -n % shards
    counts = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, d), x.dtype)])
        gates = jnp.concatenate([gates, jnp.zeros((pad, k), gates.dtype)])
        filler = (jnp.arange(pad * k, dtype=experts.dtype) % num_experts).reshape(pad, k)
        experts = jnp.concatenate([experts, filler])
    n_local = (n + pad) // shards
    # Micro-batches split each device's tokens (a decode batch too small to split runs whole).
    micro = active.moe_micro_batches if n_local % active.moe_micro_batches == 0 else 1
    n_micro = n_local // micro
    rows = n_micro * k
    # The most rows one source can route to one device: each of its tokens reaches at most
    # min(k, experts per device) of that device's experts, the k choices being distinct.
    most = n_micro * min(k, num_experts // ep)
    cap = (
        most
        if active.moe_capacity_factor is None
        else max(1, min(most, math.ceil(active.moe_capacity_factor * rows / ep)))
    )

    weight_specs = _weight_specs(expert_params, axes, expert_axis="expert")
    tok = PartitionSpec(token_axes if len(token_axes) > 1 else token_axes[0])
    body = functools.partial(
        _local_dispatch,
        activation=activation,
        num_experts=num_experts,
        ep=ep,
        cap=cap,
        method=_exchange_method(active),
        width_axes=axes,
    )
    if micro > 1:
        body = functools.partial(_in_micro_batches, body, micro)
    params = {name: expert_params[name] for name in weight_specs}
    y = shard_map(body, mesh, in_specs=(tok, tok, tok, weight_specs), out_specs=tok)(x, gates, experts, params)
    return y[:n], counts


def _in_micro_batches(
    dispatch: Callable,
    micro: int,
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    params: dict,
) -> Float[Array, "n d"]:
    """`dispatch` on `micro` equal slices of one device's tokens, concatenated. The slices share no
    data, so each is its own chain of exchange -> experts -> exchange in the program: on GPUs XLA's
    latency-hiding scheduler may overlap one slice's all-to-all with another's grouped matmuls (and
    the shared expert, computed outside). Tokens do not interact in the dispatch, so the result is
    the unsplit one."""
    split = lambda a: a.reshape(micro, -1, *a.shape[1:])  # noqa: E731
    xs, gs, es = split(x), split(gates), split(experts)
    return jnp.concatenate([dispatch(xs[i], gs[i], es[i], params) for i in range(micro)])


def _local_dispatch(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    params: dict,
    *,
    activation: str,
    num_experts: int,
    ep: int,
    cap: int,
    method: str,
    width_axes: tuple[str, ...],
) -> Float[Array, "n d"]:
    """One device's part: its tokens in, its tokens' combined expert outputs out."""
    from vishwam_jax.models.moe import expert_mlp  # local: moe imports this module

    n, d = x.shape
    k = experts.shape[1]
    rows = n * k
    e_local = num_experts // ep
    me = jax.lax.axis_index("expert")

    # 1. sort this device's (token, expert) pairs by expert: destination blocks become contiguous.
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_rows = x[order // k]
    dest = flat[order] // e_local
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)

    # 2. every device's per-expert counts: [source, destination, local expert].
    all_counts = jax.lax.all_gather(counts, "expert").reshape(ep, ep, e_local)
    send_sizes = all_counts[me].sum(-1)  # rows I route to each device
    send_start = _exclusive_cumsum(send_sizes)
    slot = jnp.arange(rows, dtype=jnp.int32) - send_start[dest]  # position inside its block
    kept = slot < cap
    recv_counts = jax.lax.dynamic_index_in_dim(all_counts, me, axis=1, keepdims=False)  # [source, local expert]
    recv_sizes = jnp.minimum(recv_counts.sum(-1), cap)

    # 3. forward exchange: received[s, :recv_sizes[s]] are source s's rows for my experts, by expert.
    if method == "ragged":
        received = jax.lax.ragged_all_to_all(
            sorted_rows,
            jnp.zeros((ep * cap, d), x.dtype),
            send_start,
            jnp.minimum(send_sizes, cap),
            jnp.full((ep,), me * cap, jnp.int32),  # my block's offset in every receiver's buffer
            recv_sizes,
            axis_name="expert",
        ).reshape(ep, cap, d)
    else:
        send = jnp.zeros((ep, cap, d), x.dtype).at[dest, slot].set(sorted_rows, mode="drop")
        received = jax.lax.all_to_all(send, "expert", 0, 0)

    # 4. local experts over the received rows, regrouped by local expert across sources.
    pos = jnp.arange(cap, dtype=jnp.int32)
    ends = jnp.cumsum(recv_counts, axis=-1)
    # compare_all: one fused kernel; the default binary search is a while loop (a launch per step on GPU)
    local_expert = jax.vmap(lambda e: jnp.searchsorted(e, pos, side="right", method="compare_all"))(ends)
    local_expert = jnp.where(pos[None, :] < recv_sizes[:, None], local_expert, e_local).reshape(
        -1
    )  # e_local: empty slot
    regroup = jnp.argsort(local_expert, stable=True)
    group_sizes = jnp.bincount(local_expert, length=e_local + 1)[:e_local].astype(jnp.int32)
    h_in = received.reshape(ep * cap, d)[regroup]
    out = expert_mlp(h_in, params, group_sizes, activation)
    # Rows past the groups are empty slots; a grouped matmul may leave anything there.
    out = jnp.where((jnp.arange(ep * cap) < group_sizes.sum())[:, None], out, 0)
    out = jnp.zeros_like(out).at[regroup].set(out)

    # 5. reverse exchange into this device's sorted order, then combine each token's k results.
    if method == "ragged":
        all_send_start = _exclusive_cumsum(all_counts.sum(-1))  # [source, destination]
        back = jax.lax.ragged_all_to_all(
            out,
            jnp.zeros((rows, d), out.dtype),
            jnp.arange(ep, dtype=jnp.int32) * cap,
            recv_sizes,
            all_send_start[:, me],  # where each source's block for me started in its sorted rows
            jnp.minimum(send_sizes, cap),
            axis_name="expert",
        )
    else:
        returned = jax.lax.all_to_all(out.reshape(ep, cap, d), "expert", 0, 0)
        back = returned[dest, jnp.minimum(slot, cap - 1)]
    back = jnp.where(kept[:, None], back, 0)
    unsorted = jnp.zeros_like(back).at[order].set(back).reshape(n, k, d)
    y = jnp.einsum("nkd,nk->nd", unsorted.astype(jnp.float32), gates.astype(jnp.float32))
    if width_axes:
        y = jax.lax.psum(y, width_axes)  # partial down-projections of the width shards
    return y.astype(x.dtype)
