"""Activation checkpointing: named `jax.checkpoint` policies applied per scanned block.

`models/stack.py` wraps each layer's body with `remat(body, policy)`; the policy is read from
`config.remat_policy` ("none" for inference), so training selects it by one config field.

    none                                  keep every activation (fastest, most memory)
    full                                  keep only each layer's inputs; recompute the layer in backward
    dots_saveable                         keep matmul outputs, recompute elementwise ops (norms, gelu, rope)
    dots_with_no_batch_dims_saveable      keep only weight matmul outputs, recompute attention
                                          scores/probabilities (batch-dim dots) as well
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax

F = TypeVar("F", bound=Callable)

POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POLICY_NAMES = ("none", *POLICIES)


def check_policy(name: str) -> str:
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    return name


def remat(fn: F, policy: str, *, prevent_cse: bool = True) -> F:
    """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself).

    prevent_cse=False inside a scan body: the scan already keeps XLA from merging the recomputation
    back into the forward, and the barrier would only cost speed.
    """
    if check_policy(policy or "none") == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=prevent_cse)


def policy_of(config) -> str:
    return config.get("remat_policy", "none") or "none"
