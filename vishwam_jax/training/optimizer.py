"""AdamW with linear warmup + cosine decay and global-norm clipping (optax), with frozen leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from vishwam_jax.training.lora import leaf_name


def make_schedule(
    learning_rate: float, total_steps: int, *, warmup_steps: int = 100, end_ratio: float = 0.1
) -> optax.Schedule:
    """0 -> learning_rate linearly over `warmup_steps`, then cosine to `end_ratio * learning_rate` at
    `total_steps`."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0 (got {total_steps}, {warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=learning_rate * end_ratio
    )


def _decay_mask(params: Any) -> Any:
    """Matrices decay; norms, biases and other vectors do not (the usual AdamW convention). A
    parameter of an nnx.State counts its dimensions without the stacked "layers" axis: a norm scale
    of stacked layers [layers, d] is a vector per layer."""
    stacked = {}
    if isinstance(params, nnx.State):
        for path, v in nnx.to_flat_state(params):
            axes = v.get_metadata().get("out_sharding") or ()
            stacked[leaf_name(path)] = sum(a == "layers" for a in axes)
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - stacked.get(leaf_name(path), 0) >= 2, params)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    total_steps: int = 1,
    *,
    warmup_steps: int = 100,
    end_ratio: float = 0.1,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    frozen: Callable[[tuple, Any], bool] | None = None,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (a float: warmup + cosine over total_steps).

    frozen(path, leaf) -> True for leaves that gradients must not move (e.g. DeepSeek-V3's router
    bias, which its own balancing rule updates): they get a zero update and no optimizer state.
    Clipping sees only the trainable leaves' gradients.
    """
    schedule = (
        learning_rate
        if callable(learning_rate)
        else make_schedule(learning_rate, total_steps, warmup_steps=warmup_steps, end_ratio=end_ratio)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask),
    )
    if frozen is None:
        return tx
    labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, x: "frozen" if frozen(p, x) else "train", params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
