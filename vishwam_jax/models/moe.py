"""Mixture-of-experts: the routers of Grok-1 and DeepSeek-V3, the stacked experts, and one sorted
dispatch for both (functional cores below, with the modules that own their parameters at the end).

Dispatch sorts the (token, expert) pairs by expert and runs each expert matrix over its contiguous
rows with a grouped matmul, so the work is proportional to tokens × experts-per-token — never a dense
all-experts product or a one-hot over experts × tokens (which does not fit at 256 experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.models.layers import ACTIVATIONS, Linear, param, quantized_gmm, truncated_normal
from vishwam_jax.quantization import Quantization, QuantizedWeight
from vishwam_jax.quantization.fp8_training import fp8_active, fp8_grouped_matmul
from vishwam_jax.sharding import context, expert_parallel


def softmax_topk_router(
    x: Float[Array, "n d"], router_w: Float[Array, "d e"], k: int, *, renormalize: bool = False
) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
    """Softmax over all experts in float32, then the top-k probabilities (Grok-1: not renormalized)."""
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, k)
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, experts


def grouped_sigmoid_router(
    x: Float[Array, "n d"],
    router_w: Float[Array, "d e"],
    bias: Float[Array, " e"],
    k: int,
    *,
    num_groups: int,
    topk_groups: int,
    routed_scaling_factor: float,
    renormalize: bool = True,
) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
    """DeepSeek-V3 routing: sigmoid affinities; the correction bias only decides *which* experts
    (pick the `topk_groups` groups with the largest sum of their two best biased scores, then the
    top-k experts inside them); the gates are the unbiased scores, renormalized and scaled."""
    n, e = x.shape[0], router_w.shape[1]
    scores = jax.nn.sigmoid(jnp.einsum("nd,de->ne", x.astype(jnp.float32), router_w.astype(jnp.float32)))
    biased = scores + bias.astype(jnp.float32)[None, :]
    if num_groups > 1:
        grouped = biased.reshape(n, num_groups, e // num_groups)
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, best_groups = jax.lax.top_k(group_score, topk_groups)
        group_mask = jnp.zeros((n, num_groups), bool).at[jnp.arange(n)[:, None], best_groups].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // num_groups, axis=1), biased, -jnp.inf)
    _, experts = jax.lax.top_k(biased, k)
    gates = jnp.take_along_axis(scores, experts, axis=-1)
    if renormalize:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return gates * routed_scaling_factor, experts


def grouped_linear(
    x: Float[Array, "m a"], w: Float[Array, "g a b"] | QuantizedWeight, group_sizes: Int[Array, " g"]
) -> Float[Array, "m b"]:
    """Rows of `x` sorted by group times each group's matrix `w[g]` ([g, a, b], possibly quantized:
    int8 scaled per output channel, fp8 in blocks over each matrix, both taken by the kernel as stored,
    K-major [g, b, a] included)."""
    from vishwam_jax.pallas_kernels import grouped_matmul  # local: kernels import nothing from models

    if isinstance(w, QuantizedWeight):
        return quantized_gmm(x, w.values, w.scale, group_sizes, w)
    if fp8_active():
        return fp8_grouped_matmul(x, w.astype(x.dtype), group_sizes)
    return grouped_matmul.gmm(x, w.astype(x.dtype), group_sizes, preferred_element_type=x.dtype)


def expert_mlp(
    rows: Float[Array, "m d"], expert_params: dict, group_sizes: Int[Array, " g"], activation: str
) -> Float[Array, "m d"]:
    """The gated MLP of each group's expert over rows sorted by group: act(x W_gate) * (x W_up) W_down."""
    act = ACTIVATIONS[activation]
    h = act(grouped_linear(rows, expert_params["gate"], group_sizes)) * grouped_linear(
        rows, expert_params["up"], group_sizes
    )
    return grouped_linear(h, expert_params["down"], group_sizes)


def to_slots(experts: Int[Array, "n k"], log2phy: Int[Array, "e c"], logcnt: Int[Array, " e"]) -> Int[Array, "n k"]:
    """The physical slot serving each (token, logical expert) pair under a placement with replicas.

    Token i goes to replica i mod (replicas of its expert): consecutive tokens, which are also the
    ones one device holds, alternate over the replicas, so a hot expert's tokens split evenly over
    its slots. Deterministic, so that a prefill and its replay pick the same slots. Distinct experts
    have disjoint slots, so a token's k slots stay distinct (the expert-parallel buffers rely on it).
    """
    token = jnp.arange(experts.shape[0], dtype=jnp.int32)[:, None]
    replica = token % jnp.maximum(logcnt[experts], 1)
    return jnp.take_along_axis(log2phy[experts], replica[..., None], axis=-1)[..., 0].astype(experts.dtype)


def dispatch_experts(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    expert_params: dict,
    activation: str,
    num_experts: int,
    placement: tuple[Int[Array, "e c"], Int[Array, " e"]] | None = None,
) -> tuple[Float[Array, "n d"], Int[Array, " e"]]:
    """Sum over each token's selected experts of gate * mlp_e(x); also the tokens per expert.

    placement: (log2phy, logcnt) when the weights hold physical slots (an EPLB placement with
    redundant replicas, sharding/placement.py): `expert_params` then stack one matrix per slot, each
    pair is sent to one replica of its expert (`to_slots`), and the counts stay per logical expert.

    expert_params: gate/up [e, d, f], down [e, f, d] (gated MLP per expert; may be quantized).
    Under `vishwam_jax.sharding.use_mesh` with an expert axis > 1 the experts run expert-parallel
    (tokens exchanged by all-to-all, sharding/expert_parallel.py); the result is the same provided
    each token's k experts are distinct, as every top-k router gives (its buffers rely on it).
    With no expert axis but the expert width sharded (rule `expert_mlp`), each device runs its width
    shard and the outputs are summed, so the grouped-matmul kernel never sees a sharded operand.
    """
    if placement is not None:
        log2phy, logcnt = placement
        counts = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)
        num_slots = num_slots_of(expert_params)
        y, _ = dispatch_experts(x, gates, to_slots(experts, log2phy, logcnt), expert_params, activation, num_slots)
        return y, counts
    active = context.current()
    if active is not None and not context.inside_manual_region():
        if active.expert_size > 1:
            return expert_parallel.dispatch_experts_parallel(
                x, gates, experts, expert_params, activation, num_experts, active
            )
        if expert_parallel.width_axes(active, expert_params):  # tensor-parallel experts (no expert axis)
            counts = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)
            local = lambda *a: _dispatch_local(*a, activation=activation, num_experts=num_experts)[0]  # noqa: E731
            y = expert_parallel.dispatch_experts_width_parallel(x, gates, experts, expert_params, local, active)
            return y.astype(x.dtype), counts
    y, counts = _dispatch_local(x, gates, experts, expert_params, activation=activation, num_experts=num_experts)
    return y.astype(x.dtype), counts


def num_slots_of(expert_params: dict) -> int:
    """How many expert matrices (slots) the stacked weights hold."""
    return expert_params["down"].shape[0]


def _dispatch_local(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    expert_params: dict,
    *,
    activation: str,
    num_experts: int,
) -> tuple[Float[Array, "n d"], Int[Array, " e"]]:
    """The sorted dispatch on one device: float32 output (summed as is over width shards) and counts."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]  # each token repeated once per selected expert, sorted by expert
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    out = expert_mlp(rows, expert_params, counts, activation)
    # Unsort with the inverse permutation and reduce over k: deterministic, no scatter-add.
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted.astype(jnp.float32), gates.astype(jnp.float32)), counts


# -- modules ---------------------------------------------------------------------------------------
class SoftmaxRouter(nnx.Module):
    """Grok-1's router: softmax over every expert in float32, top-k gates (renormalized or not).
    The weight stays float32 whatever the model dtype (the release routes in float32)."""

    def __init__(self, d: int, num_experts: int, k: int, *, renormalize: bool = False, rngs: nnx.Rngs):
        self.k, self.renormalize = k, renormalize
        self.kernel = param(
            truncated_normal(rngs.params(), (d, num_experts), d, jnp.float32), ("embed", "router_experts")
        )

    def __call__(self, x: Float[Array, "n d"]) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
        return softmax_topk_router(x, self.kernel[...], self.k, renormalize=self.renormalize)


class GroupedSigmoidRouter(nnx.Module):
    """DeepSeek-V3's router: sigmoid affinities, group-limited top-k chosen on affinity + bias (the
    auxiliary-loss-free balancing bias, which never enters a gate), float32 throughout."""

    def __init__(
        self, d: int, num_experts: int, k: int, *, num_groups: int, topk_groups: int, routed_scaling_factor: float,
        renormalize: bool = True, rngs: nnx.Rngs,
    ):  # fmt: skip
        self.k, self.num_groups, self.topk_groups = k, num_groups, topk_groups
        self.routed_scaling_factor, self.renormalize = float(routed_scaling_factor), renormalize
        self.kernel = param(
            truncated_normal(rngs.params(), (d, num_experts), d, jnp.float32), ("embed", "router_experts")
        )
        self.bias = param(jnp.zeros((num_experts,), jnp.float32), ("router_experts",))

    def __call__(self, x: Float[Array, "n d"]) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
        return grouped_sigmoid_router(
            x, self.kernel[...], self.bias[...], self.k,
            num_groups=self.num_groups, topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor, renormalize=self.renormalize,
        )  # fmt: skip


class SlotTable(nnx.Param):
    """An integer table of an expert placement (never trained: the train step and optimizer must
    not see it; a placement is a serving layout, sharding/placement.py)."""


class Experts(nnx.Module):
    """`num_experts` gated MLPs stacked: gate/up [e, d, f], down [e, f, d] (optionally quantized,
    each expert's matrix on its own, and then stored K-major: gate/up [e, f, d], down [e, d, f];
    vishwam_jax/quantization), run by the sorted dispatch over the grouped matmul.

    num_slots (>= num_experts; 0: none): the stack holds that many physical slots (an EPLB placement with
    redundant replicas of the hot experts), with `log2phy` [e, copies] (the slots of each expert,
    padded with its first) and `logcnt` [e] (replicas per expert) saying which slot serves whom.
    """

    def __init__(
        self,
        num_experts: int,
        d: int,
        f: int,
        activation: str,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        quantization: Quantization | None = None,
        num_slots: int = 0,
    ):
        self.activation, self.num_experts = activation, num_experts
        slots = num_slots or num_experts
        up_shape, down_shape = (slots, d, f), (slots, f, d)
        up_axes, down_axes = ("experts", "embed", "expert_mlp"), ("experts", "expert_mlp", "embed")
        # Each [e, in, out] (experts are a batch); quantized, stored [e, out, in] (`Linear`).
        common = dict(rngs=rngs, dtype=dtype, quantization=quantization)
        self.gate = Linear(up_shape, up_axes, "", fan_in=d, **common)
        self.up = Linear(up_shape, up_axes, "", fan_in=d, **common)
        self.down = Linear(down_shape, down_axes, "", fan_in=f, **common)
        if num_slots:
            # Identity-like until a placement is applied: expert e in slot e (and its copies' slots
            # padded with it), so a freshly built module is already a valid placement.
            copies = slots - num_experts + 1
            table = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None], (num_experts, copies))
            self.log2phy = SlotTable(table, out_sharding=(None, None), eager_sharding=False)
            self.logcnt = SlotTable(jnp.ones((num_experts,), jnp.int32), out_sharding=(None,), eager_sharding=False)
        else:
            self.log2phy = self.logcnt = None

    def weights(self) -> dict:
        """{"gate", "up", "down"}: arrays or QuantizedWeights, as the dispatch takes them."""
        return {"gate": self.gate.weight, "up": self.up.weight, "down": self.down.weight}

    def placement(self) -> tuple[Int[Array, "e c"], Int[Array, " e"]] | None:
        return None if self.log2phy is None else (self.log2phy[...], self.logcnt[...])

    def __call__(
        self, x: Float[Array, "n d"], gates: Float[Array, "n k"], experts: Int[Array, "n k"]
    ) -> tuple[Float[Array, "n d"], Int[Array, " e"]]:
        """sum_k gates[:, k] * mlp_{experts[:, k]}(x), and the tokens routed to each expert."""
        return dispatch_experts(x, gates, experts, self.weights(), self.activation, self.num_experts, self.placement())
