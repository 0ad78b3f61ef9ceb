"""Activation checkpointing: named `jax.checkpoint` policies that every family applies per layer.

A family wraps the body of one layer with `remat_layer(body, config)`; the policy is read from
`config.remat_policy` (absent: "none"), so training selects it by setting one config field and the
inference path, which never sets it, is untouched.

    none                                  keep every activation (fastest, most memory)
    full                                  keep only each layer's inputs; recompute the layer in backward
    dots_saveable                         keep matmul outputs, recompute elementwise ops (norms, gelu, rope)
    dots_with_no_batch_dims_saveable      keep only weight matmul outputs, recompute attention
                                          scores/probabilities (batch-dim dots) as well
"""

from __future__ import annotations

from typing import Callable, TypeVar

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


def remat(fn: F, policy: str) -> F:
    """`fn` under `jax.checkpoint` with the named policy ("none": `fn` itself)."""
    if check_policy(policy) == "none":
        return fn
    # prevent_cse=True (the default) because the layers are unrolled Python loops, not a scan: without
    # it XLA may merge the recomputation back into the forward and keep the activations after all.
    return jax.checkpoint(fn, policy=POLICIES[policy])


def remat_layer(fn: F, config) -> F:
    """`fn` (one layer's body; pass only arrays/pytrees as arguments, bind static values with
    functools.partial) under the policy named by `config.remat_policy`."""
    return remat(fn, config.get("remat_policy", "none") or "none")
