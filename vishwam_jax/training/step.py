"""The jitted train step, generic over model families.

    state = {"step": int32[], "params": trainable tree, "opt_state": optax state}
    new_state, metrics = train_step(state, frozen, batch)      # batch [micro_batches, b, t + 1]

`params` is the whole model (full training; `frozen` is None) or the LoRA adapters (`frozen` is the
base model, never differentiated, never in the optimizer). Gradients of the micro-batches are summed
in float32 by a scan and divided by the token counts of the whole batch, so accumulation equals one
large batch. With a compute dtype the forward and backward run in it while `params` (the master
copy) and the optimizer stay float32. DeepSeek-V3's router biases are not moved by gradients but by
the aux-loss-free rule from the step's expert loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from vishwam_jax.training import lora as lora_lib
from vishwam_jax.training.objective import cast_floating, loss_sums, mtp_depths, next_token_loss, objective, token_counts
from vishwam_jax.training.optimizer import make_optimizer

__all__ = ["StepConfig", "init_state", "make_train_step", "make_eval_step", "make_optimizer", "next_token_loss", "frozen_from_gradients"]

# Routing stays float32 in every family (the releases keep router and bias in float32): a bf16 bias
# would round away DeepSeek-V3's 0.001 balancing steps.
_FLOAT32_LEAVES = ("router", "router_bias")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    compute_dtype: Any = None  # e.g. jnp.bfloat16; None: compute in the parameters' dtype
    mtp_weight: float = 0.0  # DeepSeek-V3's λ (0.3 early in its pre-training, then 0.1)
    router_bias_rate: float = 0.0  # DeepSeek-V3's γ (0.001); 0 freezes the balancing biases
    lora: lora_lib.LoraConfig | None = None


def frozen_from_gradients(path: tuple, leaf: Any) -> bool:
    """Leaves the optimizer must leave alone: DeepSeek-V3's router biases (updated by load)."""
    return lora_lib.leaf_name(path).rsplit(".", 1)[-1] == "router_bias"


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": optimizer.init(trainable)}


def _compute_params(trainable: Any, frozen: Any, cfg: StepConfig) -> Any:
    if cfg.lora is not None:
        params = lora_lib.merge(frozen, trainable, cfg.lora, dtype=cfg.compute_dtype)
    else:
        params = trainable
    if cfg.compute_dtype is None:
        return params

    def cast(path, p):
        if lora_lib.leaf_name(path).rsplit(".", 1)[-1] in _FLOAT32_LEAVES or not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return p.astype(cfg.compute_dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _update_router_biases(family, params: dict, sums: dict, rate: float) -> dict:
    """DeepSeek-V3 §2.1.2 on the main MoE layers and on each MTP module's MoE block."""
    if not rate or "expert_counts" not in sums:
        return params
    params = family.update_router_biases(params, sums["expert_counts"], rate)
    if "mtp_expert_counts" in sums:
        mtp = []
        for k, module in enumerate(params["mtp"]):
            block = {**module["block"], "router_bias": family.update_router_bias(module["block"]["router_bias"], sums["mtp_expert_counts"][k], rate)}
            mtp.append({**module, "block": block})
        params = {**params, "mtp": mtp}
    return params


def _load_imbalance(counts: Int[Array, "l e"]) -> Array:
    """Worst layer's max expert load over the mean load (1 = perfectly balanced)."""
    counts = counts.astype(jnp.float32)
    return jnp.max(jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9))


def make_train_step(
    family,
    config,
    optimizer: optax.GradientTransformation,
    cfg: StepConfig = StepConfig(),
    *,
    schedule: optax.Schedule | None = None,
    state_shardings: Any = None,
    metrics_sharding: Any = None,
) -> Callable:
    """(state, frozen, batch [k, b, t + 1]) -> (state, metrics), jitted, `state` donated.

    metrics: loss (the optimized objective), nll (mean next-token CE), mtp (mean over depths, when
    used), grad_norm (before clipping), lr (when `schedule` is given), tokens, and for MoE families
    that report loads, load_imbalance (max/mean tokens per expert, worst layer).
    state_shardings: keep the new state on these shardings (a sharded run); metrics_sharding: where
    the metrics go (replicated on the mesh).
    """
    depths = mtp_depths(config, cfg.mtp_weight)
    if cfg.router_bias_rate and cfg.lora is not None:
        raise ValueError("the router-bias balancing update needs the base model trainable; use it without LoRA")
    if cfg.router_bias_rate and not hasattr(family, "update_router_biases"):
        raise ValueError(f"router_bias_rate is set but the {config.family} family has no aux-loss-free balancing")

    def micro_objective(trainable, frozen, micro, counts):
        sums = loss_sums(family, config, _compute_params(trainable, frozen, cfg), micro, depths)
        return objective(sums, counts, cfg.mtp_weight), sums

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def step(state: dict, frozen: Any, batch: Int[Array, "k b t1"]):
        if batch.ndim != 3:
            raise ValueError(f"batch must be [micro_batches, batch, seq_len + 1], got shape {batch.shape}")
        counts = token_counts(batch, config.pad_token_id, depths)
        trainable = state["params"]

        def accumulate(grads, micro):
            (_, sums), g = grad_fn(trainable, frozen, micro, counts)
            return jax.tree_util.tree_map(jnp.add, grads, g), sums

        if batch.shape[0] == 1:
            # No accumulation: no float32 accumulator beside the gradients (a model-sized buffer).
            (_, sums), grads = grad_fn(trainable, frozen, batch[0], counts)
        else:
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            grads, per_micro = jax.lax.scan(accumulate, zeros, batch)
            sums = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_micro)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, trainable)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        params = optax.apply_updates(trainable, updates)
        params = _update_router_biases(family, params, sums, cfg.router_bias_rate)

        metrics = {
            "loss": objective(sums, counts, cfg.mtp_weight),
            "nll": sums["nll"] / jnp.maximum(counts["main"], 1.0),
            "grad_norm": optax.tree.norm(grads),
            "tokens": counts["main"],
        }
        if "mtp" in sums:
            metrics["mtp"] = jnp.mean(sums["mtp"] / jnp.maximum(counts["mtp"], 1.0))
        if "expert_counts" in sums and sums["expert_counts"].shape[0]:
            metrics["load_imbalance"] = _load_imbalance(sums["expert_counts"])
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, metrics_sharding))


def make_eval_step(family, config, cfg: StepConfig = StepConfig(), *, out_sharding: Any = None) -> Callable:
    """(trainable, frozen, batch [1, b, t + 1]) -> (sum of next-token CE, number of targets), jitted:
    the model as the train step sees it (compute dtype, LoRA merged), no MTP, nothing updated."""

    def evaluate(trainable: Any, frozen: Any, batch: Int[Array, "1 b t1"]):
        micro = batch[0]
        sums = loss_sums(family, config, _compute_params(trainable, frozen, cfg), micro)
        return sums["nll"], token_counts(micro, config.pad_token_id, 0)["main"]

    if out_sharding is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, out_shardings=(out_sharding, out_sharding))
