"""LoRA adapters for every family: W' = W + (alpha / rank) * A @ B on chosen weights, base frozen.

Weights here are einsum operands with the input axes first, so one rule gives each weight its
low-rank shape without knowing the family:
    [in, out...]       q/k/v [d, h, hd], gate/up [d, f], wq_b [q_lora, h, hd], ...  in = axis 0
    [in..., out]       output projections o/wo [h, hd, d]                          in = all but last
    [E, in, out]       stacked experts gate/up/down                               one adapter per expert
A is [*E, prod(in), r] (random), B is [*E, r, prod(out)] (zeros), so training starts at the base model.

Adapters are a flat dict {"layers.3.attn.q": {"a": ..., "b": ...}} (dotted parameter names); the
model sees the merged weights, computed inside the jitted step in the compute dtype. int8 base
weights ({"int8", "scale"}) are frozen as they are and dequantized only for the merge.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from vishwam_jax.checkpoint.orbax_io import save_params
from vishwam_jax.models.layers import dequantize, is_quantized

# Matrices of every family that LoRA commonly adapts: attention (Gemma/Grok q k v o; DeepSeek MLA
# wq/wq_a/wq_b/wkv_a/wk_b/wv_b/wo) and MLPs/experts (gate up down).
DEFAULT_TARGETS = ("q", "k", "v", "o", "wq", "wq_a", "wq_b", "wkv_a", "wk_b", "wv_b", "wo", "gate", "up", "down")
_OUTPUT_PROJECTIONS = ("o", "wo")
_EXPERT_MATRICES = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank, alpha (the update is scaled by alpha / rank) and targets: regular expressions, each
    matched in full against a weight's dotted name ("layers.0.attn.q") or its last part ("q")."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def leaf_name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _named_weights(params: Any) -> dict[str, Any]:
    """Every parameter by dotted name; an int8 weight {"int8", "scale"} counts as one weight."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    return {leaf_name(path): leaf for path, leaf in flat}


def _shape(w: Any) -> tuple[int, ...]:
    return tuple((w["int8"] if is_quantized(w) else w).shape)


def layout(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of leading expert axes, number of input axes after them) of a weight."""
    last = name.rsplit(".", 1)[-1]
    if len(shape) < 2:
        raise ValueError(f"LoRA target {name} has shape {shape}: only matrices (2-D or more) can be adapted")
    if last in _OUTPUT_PROJECTIONS:
        return 0, len(shape) - 1
    if last in _EXPERT_MATRICES and len(shape) == 3:
        return 1, 1
    return 0, 1


def _split(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    batch, n_in = layout(name, shape)
    return shape[:batch], int(np.prod(shape[batch : batch + n_in])), int(np.prod(shape[batch + n_in :]))


def target_names(params: Any, cfg: LoraConfig) -> list[str]:
    """The dotted names of the weights `cfg.targets` selects (raises if a pattern selects nothing)."""
    names = _named_weights(params)
    patterns = [re.compile(t) for t in cfg.targets]
    chosen, used = [], set()
    for name, w in names.items():
        if len(_shape(w)) < 2:
            continue
        for p in patterns:
            if p.fullmatch(name) or p.fullmatch(name.rsplit(".", 1)[-1]):
                chosen.append(name)
                used.add(p.pattern)
    if not chosen:
        matrices = sorted({n.rsplit(".", 1)[-1] for n, w in names.items() if len(_shape(w)) >= 2})
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no weight; this model's matrices are named {matrices}")
    return sorted(set(chosen), key=list(names).index)


def init_adapters(params: Any, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, dict[str, Array]]:
    """A ~ N(0, 1/in) and B = 0 for each target (float32: adapters are the trainable master copy)."""
    names = _named_weights(params)
    adapters = {}
    for i, name in enumerate(target_names(params, cfg)):
        batch, n_in, n_out = _split(name, _shape(names[name]))
        a = jax.random.normal(jax.random.fold_in(key, i), (*batch, n_in, cfg.rank), jnp.float32) / math.sqrt(n_in)
        adapters[name] = {"a": a.astype(dtype), "b": jnp.zeros((*batch, cfg.rank, n_out), dtype)}
    return adapters


def delta(name: str, shape: tuple[int, ...], adapter: dict, scale: float) -> Float[Array, "..."]:
    """scale * A @ B in the weight's own shape (float32)."""
    ab = jnp.matmul(adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))
    return (scale * ab).reshape(shape)


def merge(params: Any, adapters: dict, cfg: LoraConfig, dtype=None) -> Any:
    """Params with W + scale * A @ B on every adapted weight, those in `dtype` (default: the weight's
    own float dtype; float32 for int8 weights). Other leaves are returned unchanged."""
    names = _named_weights(params)
    missing = set(adapters) - set(names)
    if missing:
        raise ValueError(f"adapters for weights the model does not have: {sorted(missing)}")

    def merge_one(path, w):
        name = leaf_name(path)
        if name not in adapters:
            return w
        out = jnp.dtype(dtype or (jnp.float32 if is_quantized(w) else w.dtype))
        d = delta(name, _shape(w), adapters[name], cfg.scale)
        # Added in the output dtype: a bf16 step must not hold a float32 copy of every adapted weight.
        return dequantize(w, out) + d.astype(out)

    return jax.tree_util.tree_map_with_path(merge_one, params, is_leaf=is_quantized)


def export_merged(
    dst: str | Path, params: Any, adapters: dict, cfg: LoraConfig, config, *, int8_dtype=jnp.bfloat16,
    overwrite: bool = False, files: tuple = (),
) -> None:
    """Write base + adapters as a normal model directory (loads with `vishwam_jax.load`, no LoRA
    code needed). Adapted weights keep their dtype; adapted int8 weights become `int8_dtype`
    (a low-rank update does not survive re-quantization to the base's per-channel scales)."""
    merged = merge(params, adapters, cfg, dtype=jnp.float32)
    names = _named_weights(params)
    out = jax.tree_util.tree_map_with_path(
        lambda path, m: m.astype(int8_dtype if is_quantized(names[leaf_name(path)]) else names[leaf_name(path)].dtype)
        if leaf_name(path) in adapters else m,
        merged,
        is_leaf=is_quantized,
    )
    save_params(dst, out, config, overwrite=overwrite, files=files)


def count(adapters: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters))
