"""Training objectives: next-token cross-entropy for every family, plus DeepSeek-V3's multi-token
prediction (MTP) loss and the per-expert token counts that drive its aux-loss-free balancing.

Losses are returned as *sums* over target tokens; the train step divides by the token counts of the
whole (accumulated) batch, so k micro-batches give the same gradient as one batch k times larger,
padding or not. They take the model as a module: inside a jitted function that is
`nnx.merge(graphdef, params)` of the explicitly passed parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.models.interface import CausalLM
from vishwam_jax.quantization import keeps_stored_dtype
from vishwam_jax.training.lora import leaf_name

# Routing stays float32 in every family (the releases keep router and bias in float32): a bf16 bias
# would round away DeepSeek-V3's 0.001 balancing steps.
FLOAT32_MODULES = ("router",)


def keeps_float32(name: str) -> bool:
    """Parameters of a router module ("moe_layers.router.bias", "layers.moe.router.kernel")."""
    return any(part in FLOAT32_MODULES for part in name.split("."))


def cast_floating(params: Any, dtype) -> Any:
    """Floating leaves to `dtype` (e.g. bf16 compute from float32 master weights); quantized weights
    and their scales stay as stored and routers stay float32."""
    if dtype is None:
        return params

    def cast(path, p):
        name = leaf_name(path)
        if keeps_float32(name) or keeps_stored_dtype(name, p.dtype) or not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return p.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def mtp_depths(module: CausalLM, mtp_weight: float) -> int:
    """How many MTP modules the loss uses: all the model has (when it declares the capability), or
    none when the weight is 0."""
    if not mtp_weight or not module.capabilities.mtp:
        return 0
    return int(module.config.num_mtp_layers)


def token_counts(batch: Int[Array, "... t1"], pad_id: int, depths: int) -> dict:
    """Non-pad targets of the main loss and of each MTP depth k (targets batch[..., k+1:])."""
    targets = batch[..., 1:] != pad_id
    counts = {"main": jnp.sum(targets, dtype=jnp.float32)}
    if depths:
        counts["mtp"] = jnp.stack([jnp.sum(targets[..., k:], dtype=jnp.float32) for k in range(1, depths + 1)])
    return counts


def _ce_sum(logits: Float[Array, "b t v"], targets: Int[Array, "b t"], pad_id: int) -> Float[Array, ""]:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(targets != pad_id, losses, 0.0))


def unembedded_ce_sum(
    model: CausalLM, hidden: Float[Array, "b t d"], targets: Int[Array, "b t"], pad_id: int, chunk: int | None
) -> Float[Array, ""]:
    """Cross-entropy sum of `model.unembed(hidden)` against `targets`, `chunk` positions at a time.

    The float32 logits of a whole batch are [tokens, vocab]: 4.3 GB for gemma-2b's 256k vocabulary at
    4 x 1024 tokens, and as much again for their gradient. Chunked, each piece's logits live only
    inside its step of a scan, and the backward pass recomputes them (jax.checkpoint) instead of
    keeping them: b x chunk x vocab float32 at a time. chunk=None: the whole sequence at once.
    One difference in rounding: the output weights' gradient is summed over the pieces in the
    compute dtype (a closed-over weight's cotangent has its dtype), where one whole-sequence matmul
    rounds once; equal in float32 (tested), a few bf16 roundings apart under bf16 compute.
    """
    t = hidden.shape[1]
    if chunk is None or chunk >= t:
        return _ce_sum(model.unembed(hidden), targets, pad_id)
    pieces = -(-t // chunk)
    pad = pieces * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=pad_id)  # padding targets count nothing

    def by_piece(x: Array) -> Array:  # [b, pieces * chunk, ...] -> [pieces, b, chunk, ...]
        return jnp.swapaxes(x.reshape(x.shape[0], pieces, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def piece_sum(piece: tuple[Float[Array, "b c d"], Int[Array, "b c"]]) -> Float[Array, ""]:
        h, y = piece
        return _ce_sum(model.unembed(h), y, pad_id)

    return jnp.sum(jax.lax.map(piece_sum, (by_piece(hidden), by_piece(targets))))


def loss_sums(model: CausalLM, batch: Int[Array, "b t1"], depths: int = 0, loss_chunk: int | None = None) -> dict:
    """Forward on batch[:, :-1]; cross-entropy sums against the shifted targets.

    Returns {"nll": sum over main targets} and, for families that report them (MoE), "expert_counts"
    [moe layers, E], plus with depths > 0 "mtp" [depths] sums and "mtp_expert_counts" [depths, E].
    loss_chunk: positions unembedded at a time (`unembedded_ce_sum`); None: all at once.

    MTP depth k (1-based) combines h^{k-1}_i with the embedding of t_{i+k} and predicts t_{i+k+1}
    for i = 0 .. T-k-1 (T = batch length - 1): every target the batch holds is used, which is
    `model.mtp_loss(batch)` of the model file computed as sums.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    pad = model.config.pad_token_id
    no_logits = jnp.zeros((inputs.shape[0], 0), jnp.int32)  # the loss unembeds `hidden` itself
    out = model(inputs, logit_positions=no_logits)
    sums: dict = {"nll": unembedded_ce_sum(model, out.hidden, targets, pad, loss_chunk)}
    if out.expert_counts is not None:
        sums["expert_counts"] = out.expert_counts
    if depths:
        if not model.capabilities.mtp:
            raise ValueError(f"MTP loss requested but the {model.config.family} model has no MTP module")
        t = inputs.shape[1]
        if t < depths + 1:
            raise ValueError(f"MTP depth {depths} needs sequences of at least {depths + 1} inputs, got {t}")
        hidden, mtp_sums, counts = out.hidden, [], []
        for k in range(1, depths + 1):
            n = t - k
            out_k = model.mtp(hidden[:, :n], batch[:, k : k + n], depth=k - 1, logit_positions=no_logits)
            mtp_sums.append(unembedded_ce_sum(model, out_k.hidden, batch[:, k + 1 :], pad, loss_chunk))
            counts.append(out_k.expert_counts.reshape(-1, out_k.expert_counts.shape[-1]).sum(axis=0))
            hidden = out_k.hidden
        sums["mtp"] = jnp.stack(mtp_sums)
        sums["mtp_expert_counts"] = jnp.stack(counts)
    return sums


def objective(sums: dict, counts: dict, mtp_weight: float) -> Float[Array, ""]:
    """mean next-token CE + mtp_weight * (1/D) sum_k mean CE of depth k (DeepSeek-V3 §2.2's λ)."""
    loss = sums["nll"] / jnp.maximum(counts["main"], 1.0)
    if "mtp" in sums:
        loss = loss + mtp_weight * jnp.mean(sums["mtp"] / jnp.maximum(counts["mtp"], 1.0))
    return loss


def next_token_loss(
    graphdef: nnx.GraphDef, params: nnx.State, batch: Int[Array, "b t1"], compute_dtype=None
) -> Float[Array, ""]:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1], ignoring pad targets, of the
    model `graphdef` + `params` (evaluation; training adds MTP through `loss_sums`/`objective`)."""
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype))
    sums = loss_sums(model, batch)
    return objective(sums, token_counts(batch, model.config.pad_token_id, 0), 0.0)
