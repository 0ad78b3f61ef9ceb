"""The jitted train step, generic over model families.

    graphdef, params = nnx.split(module, nnx.Param)
    state = {"step": int32[], "params": trainable, "opt_state": optax state}
    new_state, metrics = train_step(state, frozen, batch)      # batch [micro_batches, b, t + 1]

`params` is the whole parameter state (full training; `frozen` is None) or the LoRA adapters
(`frozen` is the base model's state, never differentiated, never in the optimizer). Either way the
parameters are explicit arguments: the step merges them with the module's graphdef inside jit
(`nnx.merge`) and mutates nothing. Gradients of the micro-batches are summed in float32 by a scan
and divided by the token counts of the whole batch, so accumulation equals one large batch. With a
compute dtype the forward and backward run in it while `params` (the master copy) and the optimizer
stay float32. DeepSeek-V3's router biases are not moved by gradients but by the aux-loss-free rule
from the step's expert loads.

The optimizer works on the nnx.State itself (optax maps over its leaves and keeps each nnx.Param
node with its logical axes): the state is what nnx.split gives, what nnx.merge, the sharding rules
and the checkpoint writer take, so no conversion is needed anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Int

from vishwam_jax.models.interface import CausalLM
from vishwam_jax.quantization import keeps_stored_dtype
from vishwam_jax.quantization.fp8_training import fp8_matmuls
from vishwam_jax.training import lora as lora_lib
from vishwam_jax.training.objective import (
    cast_floating,
    loss_sums,
    mtp_depths,
    next_token_loss,
    objective,
    token_counts,
)
from vishwam_jax.training.optimizer import make_optimizer

__all__ = [
    "StepConfig", "init_state", "make_train_step", "make_eval_step", "make_optimizer", "next_token_loss",
    "frozen_from_gradients", "balancing_biases",
]  # fmt: skip

# DeepSeek-V3's routers carry the auxiliary-loss-free balancing bias ("moe_layers.router.bias").
_BALANCING_BIAS = "router.bias"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    compute_dtype: Any = None  # e.g. jnp.bfloat16; None: compute in the parameters' dtype
    mtp_weight: float = 0.0  # DeepSeek-V3's λ (0.3 early in its pre-training, then 0.1)
    router_bias_rate: float = 0.0  # DeepSeek-V3's γ (0.001); 0 freezes the balancing biases
    lora: lora_lib.LoraConfig | None = None
    # Also return the step's tokens per MoE layer and expert as metrics["expert_counts"] [L, E] (an
    # array, not a scalar): what an EPLB load window (sharding/eplb.py LoadWindow) records.
    expert_counts: bool = False
    # Positions whose logits are computed at a time in the loss (objective.unembedded_ce_sum): the
    # float32 [tokens, vocab] logits of a whole batch are never materialized. None: all at once.
    loss_chunk: int | None = 256
    # DeepSeek-V3's FP8 GEMMs for the linear layers and experts, forward and backward, with tile-wise
    # scales (quantization/fp8_training.py: the recipe's numerics, not yet its speed).
    fp8: bool = False


def is_balancing_bias(name: str) -> bool:
    return name == _BALANCING_BIAS or name.endswith("." + _BALANCING_BIAS)


def frozen_from_gradients(path: tuple, leaf: Any) -> bool:
    """Leaves the optimizer must leave alone: DeepSeek-V3's router biases (updated by load) and
    quantized weights with their scales (weight-only: no gradient rule exists for them; float8 is
    inexact, so the dtype alone does not say it)."""
    name = lora_lib.leaf_name(path)
    if is_balancing_bias(name) or keeps_stored_dtype(name, leaf.dtype):
        return True
    return not jnp.issubdtype(leaf.dtype, jnp.inexact)


def balancing_biases(params: nnx.State) -> list[str]:
    """The dotted names of the router biases that aux-loss-free balancing moves (none outside DeepSeek-V3)."""
    return [n for n in (lora_lib.leaf_name(p) for p, _ in nnx.to_flat_state(params)) if is_balancing_bias(n)]


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": optimizer.init(trainable)}


def _split(module: CausalLM) -> tuple[nnx.GraphDef, nnx.State]:
    """The module's graphdef and (abstract) parameter state; the module may be abstract itself."""
    return nnx.split(module, nnx.Param)


def _compute_model(graphdef: nnx.GraphDef, trainable: Any, frozen: Any, cfg: StepConfig) -> CausalLM:
    """The model the forward runs: LoRA merged in, floats in the compute dtype (inside jit)."""
    params = lora_lib.merge(frozen, trainable, cfg.lora, dtype=cfg.compute_dtype) if cfg.lora is not None else trainable
    return nnx.merge(graphdef, cast_floating(params, cfg.compute_dtype))


def _update_router_biases(params: nnx.State, sums: dict, rate: float) -> nnx.State:
    """DeepSeek-V3 §2.1.2 on the main MoE layers and, when MTP ran (λ > 0), on each MTP depth's
    MoE block, by the model file's rule, from the step's summed expert loads."""
    from vishwam_jax.models import deepseek_v3

    return deepseek_v3.update_router_biases(params, sums["expert_counts"], rate, sums.get("mtp_expert_counts"))


def _load_imbalance(counts: Int[Array, "l e"]) -> Array:
    """Worst layer's max expert load over the mean load (1 = perfectly balanced)."""
    counts = counts.astype(jnp.float32)
    return jnp.max(jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9))


def make_train_step(
    module: CausalLM,
    optimizer: optax.GradientTransformation,
    cfg: StepConfig = StepConfig(),
    *,
    schedule: optax.Schedule | None = None,
    state_shardings: Any = None,
    metrics_sharding: Any = None,
) -> Callable:
    """(state, frozen, batch [k, b, t + 1]) -> (state, metrics), jitted, `state` donated.

    module: the family's nnx.Module (concrete or abstract, e.g. `models.abstract(config)`); only its
      graphdef is kept. Its config decides the remat policy (`presets.replace(config, remat_policy=...)`).
    metrics: loss (the optimized objective), nll (mean next-token CE), mtp (mean over depths, when
    used), grad_norm (before clipping), lr (when `schedule` is given), tokens, and for MoE families
    that report loads, load_imbalance (max/mean tokens per expert, worst layer).
    state_shardings: keep the new state on these shardings (a sharded run); metrics_sharding: where
    the metrics go (replicated on the mesh).
    """
    config = module.config
    graphdef, abstract_params = _split(module)
    depths = mtp_depths(module, cfg.mtp_weight)
    if cfg.router_bias_rate and cfg.lora is not None:
        raise ValueError("the router-bias balancing update needs the base model trainable; use it without LoRA")
    if cfg.router_bias_rate and not (module.capabilities.moe and balancing_biases(abstract_params)):
        raise ValueError(f"router_bias_rate is set but the {config.family} model has no aux-loss-free balancing biases")

    def micro_objective(trainable, frozen, micro, counts):
        with fp8_matmuls() if cfg.fp8 else contextlib.nullcontext():
            sums = loss_sums(_compute_model(graphdef, trainable, frozen, cfg), micro, depths, cfg.loss_chunk)
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
        if cfg.router_bias_rate:
            params = _update_router_biases(params, sums, cfg.router_bias_rate)

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
            if cfg.expert_counts:
                metrics["expert_counts"] = sums["expert_counts"].astype(jnp.int32)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, metrics_sharding))


def make_eval_step(module: CausalLM, cfg: StepConfig = StepConfig(), *, out_sharding: Any = None) -> Callable:
    """(trainable, frozen, batch [1, b, t + 1]) -> (sum of next-token CE, number of targets), jitted:
    the model as the train step sees it (compute dtype, LoRA merged), no MTP, nothing updated."""
    graphdef, _ = _split(module)
    pad = module.config.pad_token_id

    def evaluate(trainable: Any, frozen: Any, batch: Int[Array, "1 b t1"]):
        micro = batch[0]
        sums = loss_sums(_compute_model(graphdef, trainable, frozen, cfg), micro, loss_chunk=cfg.loss_chunk)
        return sums["nll"], token_counts(micro, pad, 0)["main"]

    if out_sharding is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, out_shardings=(out_sharding, out_sharding))
