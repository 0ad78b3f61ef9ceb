"""Model families as Flax NNX modules (models/interface.py says what each provides).

module = build(config, rngs=nnx.Rngs(0))              # the family's nnx.Module
graphdef, params = nnx.split(module, nnx.Param)        # once; params is an ordinary pytree
out = apply(graphdef, params, tokens, cache=cache)     # inside jit: merge, call, nothing mutated
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
from flax import nnx

from vishwam_jax.models.interface import Capabilities, CausalLM, ForwardOutput

_FAMILIES = {
    "gemma": ("vishwam_jax.models.gemma", "Gemma"),
    "deepseek_v3": ("vishwam_jax.models.deepseek_v3", "DeepSeekV3"),
    "grok1": ("vishwam_jax.models.grok1", "Grok1"),
}


def family_class(config) -> type:
    family = config.family
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(_FAMILIES)}")
    module_name, class_name = _FAMILIES[family]
    return getattr(importlib.import_module(module_name), class_name)


def build(config, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32) -> CausalLM:
    """The family module of `config` with fresh (seeded) parameters."""
    return family_class(config)(config, rngs=rngs or nnx.Rngs(0), dtype=dtype)


def abstract(config, dtype=jnp.float32) -> CausalLM:
    """The family module with ShapeDtypeStructs for parameters: structure and logical axes, no memory."""
    return nnx.eval_shape(lambda: build(config, dtype=dtype))


def apply(graphdef: nnx.GraphDef, params: Any, *args, method: str = "__call__", **kwargs) -> Any:
    """Call `method` of the module `graphdef` + `params` (pure: for use inside jit and grad)."""
    return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)


__all__ = ["Capabilities", "CausalLM", "ForwardOutput", "abstract", "apply", "build", "family_class"]
