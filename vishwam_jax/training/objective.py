"""Training objectives: next-token cross-entropy for every family, plus DeepSeek-V3's multi-token
prediction (MTP) loss and the per-expert token counts that drive its aux-loss-free balancing.

Losses are returned as *sums* over target tokens; the train step divides by the token counts of the
whole (accumulated) batch, so k micro-batches give the same gradient as one batch k times larger,
padding or not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def cast_floating(tree: Any, dtype) -> Any:
    """Floating leaves to `dtype` (e.g. bf16 compute from float32 master weights); int8 stays int8."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree)


def mtp_depths(config, mtp_weight: float) -> int:
    """How many MTP modules the loss uses: all the model has, or none when the weight is 0."""
    return int(config.get("num_mtp_layers", 0) or 0) if mtp_weight else 0


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


def loss_sums(family, config, params: Any, batch: Int[Array, "b t1"], depths: int = 0) -> dict:
    """Forward on batch[:, :-1]; cross-entropy sums against the shifted targets.

    Returns {"nll": sum over main targets} and, for families that report them (DeepSeek-V3),
    "expert_counts" [moe layers, E], plus with depths > 0 "mtp" [depths] sums and
    "mtp_expert_counts" [depths, E].

    MTP depth k (1-based) combines h^{k-1}_i with the embedding of t_{i+k} and predicts t_{i+k+1}
    for i = 0 .. T-k-1 (T = batch length - 1): every target the batch holds is used, which is
    `family.mtp_loss(params, batch)` of the model file computed as sums.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    pad = config.pad_token_id
    out: dict = {}
    if hasattr(family, "forward_with_aux"):
        logits, _, aux = family.forward_with_aux(params, inputs, config)
        out["expert_counts"] = aux["expert_counts"]
    else:
        if depths:
            raise ValueError(f"MTP loss requested but the {config.family} family has no forward_with_aux/mtp_forward")
        logits, _ = family.forward(params, inputs, config)
        aux = {}
    out["nll"] = _ce_sum(logits, targets, pad)
    if depths:
        t = inputs.shape[1]
        if t < depths + 1:
            raise ValueError(f"MTP depth {depths} needs sequences of at least {depths + 1} inputs, got {t}")
        hidden, sums, counts = aux["hidden"], [], []
        for k in range(1, depths + 1):
            n = t - k
            logits_k, _, aux_k = family.mtp_forward(params, hidden[:, :n], batch[:, k : k + n], config, depth=k - 1)
            sums.append(_ce_sum(logits_k, batch[:, k + 1 :], pad))
            counts.append(aux_k["expert_counts"][0])
            hidden = aux_k["hidden"]
        out["mtp"] = jnp.stack(sums)
        out["mtp_expert_counts"] = jnp.stack(counts)
    return out


def objective(sums: dict, counts: dict, mtp_weight: float) -> Float[Array, ""]:
    """mean next-token CE + mtp_weight * (1/D) sum_k mean CE of depth k (DeepSeek-V3 §2.2's λ)."""
    loss = sums["nll"] / jnp.maximum(counts["main"], 1.0)
    if "mtp" in sums:
        loss = loss + mtp_weight * jnp.mean(sums["mtp"] / jnp.maximum(counts["mtp"], 1.0))
    return loss


def next_token_loss(family, config, params: Any, batch: Int[Array, "b t1"], compute_dtype=None) -> Float[Array, ""]:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1], ignoring pad targets
    (evaluation; training adds MTP through `loss_sums`/`objective`)."""
    sums = loss_sums(family, config, cast_floating(params, compute_dtype), batch)
    return objective(sums, token_counts(batch, config.pad_token_id, 0), 0.0)
