"""Helpers shared by the Grok-1 tests: tiny configs, random parameters that make every detail of the
architecture visible in the logits, and a jitted forward.

Parameters are the pure nested dict of the module's Param state (`nnx.to_pure_dict`): module
attribute paths, every layer stacked on the leading axis of the `layers` leaves, e.g.
params["layers"]["attn"]["q"]["kernel"] [L, d, h, hd]. `layer(params, i)` is one layer's slice.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vishwam_jax as vj
from vishwam_jax import models
from vishwam_jax.presets import get_config

NORMS = ("attn_norm", "post_attn_norm", "moe_norm", "post_moe_norm")


def tiny_config(**overrides):
    return get_config("grok-1-tiny", **overrides)


def layer(params: dict, i: int) -> dict:
    """Layer i of the stacked `layers` tree."""
    return jax.tree_util.tree_map(lambda a: a[i], params["layers"])


def random_params(config, seed: int = 0, q_gain: float = 1.0) -> dict:
    """float32 parameters with non-trivial norm weights (so `w` vs `1 + w` and every norm's placement
    matter) and, with q_gain > 1, attention scores large enough for the tanh cap of 30 to bite.

    Filled by numpy (compiling the random initialisers of a 12-layer model costs more CPU time than
    the tests themselves), drawing layer by layer in a fixed order, then stacked into the module's
    tree (whose shapes come from the abstract module: no memory)."""
    shapes = nnx.to_pure_dict(nnx.state(models.abstract(config), nnx.Param))
    rng = np.random.default_rng(seed)
    d = config.d_model

    def normal(shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def layer_shape(*path):  # one layer's shape of a stacked leaf
        node = shapes["layers"]
        for key in path:
            node = node[key]
        return node.shape[1:]

    # The draw order of the layout these tests were written against (leaves sorted by name, layer
    # by layer), so the parameter values are the same as ever.
    embed = normal(shapes["embed"]["embedding"].shape, d)
    normal((d,), d)  # the final norm's first draw (replaced below)
    layers = []
    for _ in range(config.num_layers):
        attn = {}
        for name in ("k", "o", "q", "v"):
            shape = layer_shape("attn", name, "kernel")
            attn[name] = normal(shape, shape[0] * shape[1] if name == "o" else shape[0])
        norms = {"attn_norm": normal((d,), d)}
        experts = {
            name: normal(layer_shape("experts", name, "kernel"), layer_shape("experts", name, "kernel")[1])
            for name in ("down", "gate", "up")
        }
        for name in ("moe_norm", "post_attn_norm", "post_moe_norm"):
            norms[name] = normal((d,), d)
        router = normal(layer_shape("router", "kernel"), d)
        layers.append({"attn": attn, "experts": experts, "router": router, **norms})
    final_norm = rng.uniform(0.5, 1.5, (d,)).astype(np.float32)
    for lay in layers:
        for name in NORMS:
            lay[name] = rng.uniform(0.3, 2.0, (d,)).astype(np.float32)
        lay["attn"]["q"] = lay["attn"]["q"] * np.float32(q_gain)
        lay["router"] = lay["router"] * np.float32(4.0)  # decisive routing: top-2 stable under rounding
    stacked = lambda get: np.stack([get(lay) for lay in layers])  # noqa: E731
    out = {
        "embed": {"embedding": embed},
        "final_norm": {"scale": final_norm},
        "layers": {
            **{name: {"scale": stacked(lambda lay, n=name: lay[n])} for name in NORMS},
            "attn": {k: {"kernel": stacked(lambda lay, k=k: lay["attn"][k])} for k in ("q", "k", "v", "o")},
            "router": {"kernel": stacked(lambda lay: lay["router"])},
            "experts": {k: {"kernel": stacked(lambda lay, k=k: lay["experts"][k])} for k in ("gate", "up", "down")},
        },
    }
    chex.assert_trees_all_equal_shapes(out, shapes)  # the module's tree, leaf for leaf
    return out


def _pure(params) -> dict:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def module(config, params) -> nnx.Module:
    """The Grok-1 module of `config` holding `params` (a pure dict or an nnx.State)."""
    graphdef, state = nnx.split(models.abstract(config), nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, _pure(params)))
    return nnx.merge(graphdef, state)


def make_model(config, params) -> vj.Model:
    return vj.Model(module(config, params))


def jit_forward(config, **call):
    """fn(params, tokens) -> float32 logits: params a pure dict (numpy or jax arrays) or an
    nnx.State; the module is merged from them inside the jitted function (nothing mutated)."""
    graphdef, abstract_state = nnx.split(models.abstract(config), nnx.Param)

    @jax.jit
    def forward(pure, tokens):
        state = jax.tree_util.tree_map(lambda x: x, abstract_state)  # a fresh State to fill
        nnx.replace_by_pure_dict(state, pure)
        return models.apply(graphdef, state, tokens, **call).logits

    return lambda params, tokens: forward(jax.tree_util.tree_map(jnp.asarray, _pure(params)), tokens)
