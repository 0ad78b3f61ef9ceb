"""A DeepSeek-V3 whose MTP module drafts well: speculative decoding tests need drafts that are often,
but not always, right, so that both the accepting and the rejecting path run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def good_drafter(params, eps):
    """Shrink every block's output by `eps` so the main model is nearly a bigram table
    norm(embed(t)) @ head, and make the MTP module exactly that table applied to its token: its
    drafts are then often, but not always, right — both verification paths run."""
    p = nnx.to_pure_dict(params)  # nested dicts of arrays (stacks: every layer at once)
    m = p["mtp_layers"]
    for layer, scale in ((p["dense_layers"], eps), (p["moe_layers"], eps), (m["block"], 0.0)):
        layer["attn"]["wo"]["kernel"] = layer["attn"]["wo"]["kernel"] * scale
        for name in ("mlp", "experts", "shared"):
            if name in layer:
                layer[name]["down"]["kernel"] = layer[name]["down"]["kernel"] * scale
    d = m["enorm"]["scale"].shape[-1]
    m["eh_proj"]["kernel"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])[None].astype(m["eh_proj"]["kernel"].dtype)
    m["enorm"]["scale"] = jnp.ones_like(m["enorm"]["scale"])
    m["norm"]["scale"] = p["final_norm"]["scale"][None]
    new = jax.tree_util.tree_map(lambda x: x, params)
    nnx.replace_by_pure_dict(new, p)
    return new
