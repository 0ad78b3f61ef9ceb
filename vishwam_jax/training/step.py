"""Next-token loss and a jitted AdamW train step, generic over model families."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def make_optimizer(
    learning_rate: float, total_steps: int, *, warmup_steps: int = 100, weight_decay: float = 0.1,
    clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95,
) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 10%, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=learning_rate * 0.1
    )
    # Norms and other vectors are not decayed.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def next_token_loss(
    family, config, params: Any, batch: Int[Array, "b t1"], compute_dtype=None
) -> Float[Array, ""]:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1], ignoring pad targets.

    compute_dtype: cast parameters for the forward (e.g. bf16 compute on float32 master weights).
    """
    if compute_dtype is not None:
        params = jax.tree_util.tree_map(
            lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
        )
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, _ = family.forward(params, inputs, config)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = (targets != config.pad_token_id).astype(jnp.float32)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(family, config, optimizer: optax.GradientTransformation, compute_dtype=None):
    """(params, opt_state, batch) -> (params, opt_state, loss), jitted with donated state."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(family, config, p, batch, compute_dtype))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
