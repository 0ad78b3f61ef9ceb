"""Helpers shared by the Grok-1 tests: tiny configs, random parameters that make every detail of the
architecture visible in the logits, and a jitted forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vishwam_jax.models import grok1
from vishwam_jax.presets import get_config


def tiny_config(**overrides):
    c = get_config("grok-1-tiny")
    for k, v in overrides.items():
        c[k] = v
    return c


def random_params(config, seed: int = 0, q_gain: float = 1.0) -> dict:
    """float32 parameters with non-trivial norm weights (so `w` vs `1 + w` and every norm's placement
    matter) and, with q_gain > 1, attention scores large enough for the tanh cap of 30 to bite."""
    # The model's own tree (shapes only: tracing is cheap), filled by numpy: compiling the random
    # initialisers of a 12-layer model costs more CPU time than the tests themselves.
    shapes = jax.eval_shape(lambda key: grok1.init_params(config, key, jnp.float32), jax.random.key(0))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (rng.standard_normal(s.shape) / np.sqrt(_fan_in(path[-1].key, s.shape))).astype(np.float32), shapes
    )
    params["final_norm"] = rng.uniform(0.5, 1.5, params["final_norm"].shape).astype(np.float32)
    for layer in params["layers"]:
        for name in ("attn_norm", "post_attn_norm", "moe_norm", "post_moe_norm"):
            layer[name] = rng.uniform(0.3, 2.0, layer[name].shape).astype(np.float32)
        layer["attn"]["q"] = layer["attn"]["q"] * np.float32(q_gain)
        layer["router"] = layer["router"] * np.float32(4.0)  # decisive routing: top-2 stable under rounding
    return params


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    if name == "o":
        return shape[0] * shape[1]  # [h, hd, d]
    if name in ("gate", "up", "down"):
        return shape[1]  # [e, in, out]
    return shape[-1] if name == "embed" else shape[0]


def jit_forward(config):
    return jax.jit(lambda params, tokens: grok1.forward(params, tokens, config)[0])
