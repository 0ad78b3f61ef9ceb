"""LoRA adapters for every family: W' = W + (alpha / rank) * A @ B on chosen weights, base frozen.

A target is the `kernel` of a `Linear` module, chosen by the module's attribute name (q, k, v, o,
wq_a, ..., gate, up, down) or its dotted path. Each kernel names its logical axes, and those give the
adapter its shape without knowing the family:
    leading "layers" / "experts" axes   stacked layers, stacked experts: one adapter per layer (per expert)
    then [in, out...]                   q/k/v [d, h, hd], gate/up [d, f], wq_b [q_lora, h, hd], ...   in = 1 axis
    or   [in..., out]                   output projections o/wo [h, hd, d]                           in = all but last
A is [*batch, prod(in), r] (random), B is [*batch, r, prod(out)] (zeros), so training starts at the base model.

Adapters are a flat dict {"blocks.layers.0.attn.q.kernel": {"a": ..., "b": ...}} keyed by the
kernel's dotted path in the parameter state; the model sees the merged state, computed inside the
jitted step in the compute dtype. A quantized kernel (Linear with `kernel_scale`, int8 or fp8) stays
quantized and frozen; merged, it holds the dense W' with unit scales, so the module (and a merged
export's layout, which `vishwam_jax.load` checks against the config) is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from vishwam_jax.checkpoint.orbax_io import save_params
from vishwam_jax.quantization import SCALE_NAME, is_storage_dtype
from vishwam_jax.quantization.formats import weight_of

# Matrices of every family that LoRA commonly adapts: attention (Gemma/Grok q k v o; DeepSeek MLA
# wq/wq_a/wq_b/wkv_a/wk_b/wv_b/wo) and MLPs/experts (gate up down).
DEFAULT_TARGETS = ("q", "k", "v", "o", "wq", "wq_a", "wq_b", "wkv_a", "wk_b", "wv_b", "wo", "gate", "up", "down")
_OUTPUT_PROJECTIONS = ("o", "wo")
# Leading logical axes that stack independent matrices: each slice gets its own adapter.
_STACKED_AXES = ("layers", "experts")
_KERNEL = "kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank, alpha (the update is scaled by alpha / rank) and targets: regular expressions, each
    matched in full against a Linear's attribute name ("q"), its dotted module path
    ("blocks.layers.0.attn.q") or its kernel's path ("blocks.layers.0.attn.q.kernel")."""

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
    """Dotted name of a leaf from a jax key path or an nnx flat-state path ("blocks.layers.0.attn.q.kernel").
    The `.value` attribute step into an nnx.Variable is not part of the name."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(getattr(k, "key", getattr(k, "idx", k))))
    return ".".join(parts)


def _variables(params: nnx.State) -> dict[str, nnx.Variable]:
    """Every parameter of the state by dotted name (concrete or abstract values)."""
    if not isinstance(params, nnx.State):
        raise TypeError(
            f"LoRA works on the model's parameter state (nnx.State from nnx.split); got {type(params).__name__}"
        )
    return {leaf_name(path): v for path, v in nnx.to_flat_state(params)}


def _axes(variable: nnx.Variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or (None,) * len(variable.get_value().shape))


def layout(name: str, axes: tuple, shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of leading stacked axes, number of input axes after them) of a kernel."""
    batch = 0
    while batch < len(shape) and axes[batch] in _STACKED_AXES:
        batch += 1
    rest = len(shape) - batch
    if rest < 2:
        raise ValueError(
            f"LoRA target {name} has shape {shape} (axes {axes}): only matrices (2-D or more) can be adapted"
        )
    module = name.rsplit(".", 2)[-2] if name.endswith("." + _KERNEL) else name.rsplit(".", 1)[-1]
    return batch, (rest - 1 if module in _OUTPUT_PROJECTIONS else 1)


def _k_major(variable: nnx.Variable) -> bool:
    """A quantized kernel stored [..., N, K] (vishwam_jax/quantization): adapters follow the float layout."""
    return bool(variable.get_metadata().get("k_major", False))


def _float_shape(variable: nnx.Variable) -> tuple[int, ...]:
    shape = tuple(variable.get_value().shape)
    return (*shape[:-2], shape[-1], shape[-2]) if _k_major(variable) else shape


def _split(name: str, variable: nnx.Variable) -> tuple[tuple[int, ...], int, int]:
    shape, axes = _float_shape(variable), _axes(variable)
    if _k_major(variable):
        axes = (*axes[:-2], axes[-1], axes[-2])
    batch, n_in = layout(name, axes, shape)
    return shape[:batch], int(np.prod(shape[batch : batch + n_in])), int(np.prod(shape[batch + n_in :]))


def _is_matrix(variable: nnx.Variable) -> bool:
    axes, shape = _axes(variable), variable.get_value().shape
    return len([a for a in axes if a not in _STACKED_AXES]) >= 2 and len(shape) >= 2


def target_names(params: nnx.State, cfg: LoraConfig) -> list[str]:
    """The kernel paths `cfg.targets` selects, in state order (raises if nothing is selected)."""
    variables = _variables(params)
    patterns = [re.compile(t) for t in cfg.targets]
    chosen = []
    for name, v in variables.items():
        if not name.endswith("." + _KERNEL) or not _is_matrix(v):
            continue
        module = name[: -len(_KERNEL) - 1]
        candidates = (name, module, module.rsplit(".", 1)[-1])
        if any(p.fullmatch(c) for p in patterns for c in candidates):
            chosen.append(name)
    if not chosen:
        modules = sorted(
            {n.rsplit(".", 2)[-2] for n, v in variables.items() if n.endswith("." + _KERNEL) and _is_matrix(v)}
        )
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no weight; this model's matrices are named {modules}")
    return chosen


def init_adapters(params: nnx.State, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, dict[str, Array]]:
    """A ~ N(0, 1/in) and B = 0 for each target (float32: adapters are the trainable master copy)."""
    variables = _variables(params)
    adapters = {}
    for i, name in enumerate(target_names(params, cfg)):
        batch, n_in, n_out = _split(name, variables[name])
        a = jax.random.normal(jax.random.fold_in(key, i), (*batch, n_in, cfg.rank), jnp.float32) / math.sqrt(n_in)
        adapters[name] = {"a": a.astype(dtype), "b": jnp.zeros((*batch, cfg.rank, n_out), dtype)}
    return adapters


def delta(shape: tuple[int, ...], adapter: dict, scale: float) -> Float[Array, "..."]:  # noqa: UP037 (jaxtyping shape)
    """scale * A @ B (batched over stacked layers / experts) in the weight's own shape (float32)."""
    ab = jnp.matmul(adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))
    return (scale * ab).reshape(shape)


def _scale_of(kernel_name: str) -> str:
    return kernel_name[: -len(_KERNEL)] + SCALE_NAME


def merge(params: nnx.State, adapters: dict, cfg: LoraConfig, dtype=None) -> nnx.State:
    """The state with W + scale * A @ B on every adapted kernel, in `dtype` (default: the kernel's
    own float dtype; float32 for quantized kernels, whose scales become ones). Other leaves unchanged."""
    variables = _variables(params)
    missing = set(adapters) - set(variables)
    if missing:
        raise ValueError(f"adapters for weights the model does not have: {sorted(missing)}")
    quantized = {n for n in adapters if is_storage_dtype(variables[n].get_value().dtype)}
    unit_scales = {_scale_of(n) for n in quantized}

    def merge_one(name: str, v: nnx.Variable) -> nnx.Variable:
        w = v.get_value()
        if name in unit_scales:  # the merged kernel is the dense weight: scaling by 1 leaves it so
            return v.replace(jnp.ones(w.shape, w.dtype))
        if name not in adapters:
            return v
        if name in quantized:
            out = jnp.dtype(dtype or jnp.float32)
            base = weight_of(v, variables[_scale_of(name)]).dequantize(jnp.float32)  # the float layout
        else:
            out = jnp.dtype(dtype or w.dtype)
            base = w
        # Added in the output dtype: a bf16 step must not hold a float32 copy of every adapted weight.
        merged = base.astype(out) + delta(_float_shape(v), adapters[name], cfg.scale).astype(out)
        return v.replace(merged.swapaxes(-1, -2) if _k_major(v) else merged)  # back as the kernel is stored

    return nnx.from_flat_state([(path, merge_one(leaf_name(path), v)) for path, v in nnx.to_flat_state(params)])


def export_merged(
    dst: str | Path,
    params: nnx.State,
    adapters: dict,
    cfg: LoraConfig,
    config,
    *,
    int8_dtype=jnp.bfloat16,
    overwrite: bool = False,
    files: tuple = (),
) -> None:
    """Write base + adapters as a normal model directory (loads with `vishwam_jax.load`, no LoRA
    code needed). Adapted weights keep their dtype; adapted quantized kernels become `int8_dtype` with
    unit scales (a low-rank update does not survive re-quantization to the base's scales)."""
    variables = _variables(params)
    merged = merge(params, adapters, cfg, dtype=jnp.float32)

    def cast(path, v: nnx.Variable) -> nnx.Variable:
        name = leaf_name(path)
        if name not in adapters:
            return v
        original = variables[name].get_value().dtype
        return v.replace(v.get_value().astype(int8_dtype if is_storage_dtype(original) else original))

    out = nnx.from_flat_state([(path, cast(path, v)) for path, v in nnx.to_flat_state(merged)])
    save_params(dst, out, config, overwrite=overwrite, files=files)


def count(adapters: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters))
