"""`load`: a preset name, a config (random weights) or a model directory (Orbax), optionally onto a mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vishwam_jax import models
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.model import Model
from vishwam_jax.models import stack
from vishwam_jax.presets import UnknownModelError, get_config, list_models, replace
from vishwam_jax.quantization import Quantization, QuantizationError, check_format
from vishwam_jax.quantization.formats import ACTIVATION_FORMATS
from vishwam_jax.quantization.params import quantize_params
from vishwam_jax.tokenizer import load_tokenizer

# The embedded demo model: a small byte-level Gemma trained on Shakespeare by scripts/train_demo.py.
DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "gemma-shakespeare"
# Presets whose trained weights ship with the package: their name loads those weights, because a
# random-weights model under the demo's own name only ever prints gibberish. The config alone
# (`load(get_config(name))`, or training from scratch) still initialises randomly.
EMBEDDED_MODELS = {"gemma-shakespeare": DEFAULT_MODEL_DIR}


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.startswith((".", "~")) or Path(name).expanduser().exists()


def load(
    source: str | Path | ml_collections.ConfigDict,
    *,
    dtype=None,
    mesh=None,
    rules=None,
    seed: int = 0,
    unstack_layers: bool | None = None,
    expert_placement=None,
    quantize: str | None = None,
    quantize_activations: str | None = None,
) -> Model:
    """Return a `Model`.

    source: a preset name from `list_models()` or a config (`get_config(...)`): randomly initialised
      weights from `seed` (except the names in EMBEDDED_MODELS, which load their trained weights);
      or a model directory written by `convert`/training.
    dtype: parameter dtype (default: float32 for random weights, the stored dtype for checkpoints).
    mesh, rules: place the parameters sharded on `mesh` by the logical-axis `rules`
      (see vishwam_jax.sharding); each host then reads only its own shards.
    unstack_layers: hold each stacked weight as one buffer per layer (models/stack.py), which XLA's
      GPU backend reads in place where it copies a scanned layer's slice out of the stack; the
      layers then run unrolled, so compiling takes longer with depth. None (default): on GPUs only.
    expert_placement: an EPLB placement (JSON file from `python -m vishwam_jax.sharding.eplb`, or a
      `sharding.eplb.Placement`) for MoE models: the expert weights are copied into its physical
      slots (hot experts replicated) on `mesh`; logits are unchanged (sharding/placement.py).
    quantize: "int8" or "fp8" (vishwam_jax/quantization): the matmul weights of a float model are
      quantized as it loads (norms, routers, embeddings stay float). A directory converted quantized
      loads as stored; asking it for another format is a QuantizationError.
    quantize_activations: "fp8" (fp8 weights only): every product quantizes its input to float8 in
      1 x 128 tiles too, so that both operands meet on FP8 tensor cores, as DeepSeek-V3's own
      inference does; the default runs the activations in their float dtype (weight-only).
    """
    if quantize is not None:
        check_format(quantize)
    if expert_placement is not None:
        from vishwam_jax.sharding.placement import apply_placement

        base = load(
            source, dtype=dtype, mesh=mesh, rules=rules, seed=seed, unstack_layers=False, quantize=quantize,
            quantize_activations=quantize_activations,
        )  # fmt: skip
        return apply_placement(base, expert_placement, mesh=mesh, rules=rules, unstack_layers=unstack_layers)
    unstack = jax.default_backend() == "gpu" if unstack_layers is None else bool(unstack_layers)

    def wanted(config, where: str):
        return _with_activations(_quantized(config, quantize, where), quantize_activations, where)

    if isinstance(source, ml_collections.ConfigDict):
        config = wanted(replace(source), "the config")
        return _random(config, dtype or jnp.float32, mesh, rules, seed, unstack)
    name = str(source)
    if not _looks_like_path(name) and name in EMBEDDED_MODELS:
        name = str(EMBEDDED_MODELS[name])
    if not _looks_like_path(name) and name in list_models():
        config = wanted(get_config(name), name)
        return _random(config, dtype or jnp.float32, mesh, rules, seed, unstack)
    if not _looks_like_path(name):
        try:
            get_config(name)  # raises with close matches
        except UnknownModelError as err:
            raise UnknownModelError(f"{err} (and no directory named {name!r} exists)") from None
    path = Path(name).expanduser()
    stored_config = orbax_io.read_config(path)
    config = wanted(stored_config, str(path))
    if config.quantization == stored_config.quantization:
        stored_config = config  # the same layout; its products may quantize their inputs
    graphdef, abstract_state = nnx.split(models.abstract(stored_config), nnx.Param)
    _check_layout(path, abstract_state)
    shardings = None
    if mesh is not None:
        from vishwam_jax.sharding import param_shardings

        shardings = param_shardings(abstract_state, mesh, rules, stored_config)
        shardings = orbax_io.to_disk_tree(nnx.to_pure_dict(shardings))
    stored = orbax_io.restore_params(path, dtype=dtype, shardings=shardings)
    nnx.replace_by_pure_dict(abstract_state, orbax_io.from_disk_tree(stored))
    graphdef, params = _quantize_if_asked(abstract_state, graphdef, stored_config, config, mesh, rules)
    params = stack.unstack_layers(params, delete_stacked=True) if unstack else params
    return Model(nnx.merge(graphdef, params), load_tokenizer(config, path))


def _with_activations(config, activations: str | None, where: str):
    """`config` with its products' inputs quantized as `activations` asks (fp8 weights only)."""
    if activations is None or activations == config.quantization_activations:
        return config
    if activations not in ACTIVATION_FORMATS:
        raise QuantizationError(f"quantize_activations {activations!r} is not one of {', '.join(ACTIVATION_FORMATS)}")
    if activations != "none" and config.quantization != "fp8":
        raise QuantizationError(
            f"{where} has {config.quantization} weights; fp8 activations need fp8 weights (quantize='fp8')"
        )
    return replace(config, quantization_activations=activations)


def _quantized(config, quantize: str | None, where: str):
    """The config of the model to return: `config` with `quantize` applied to a float model; a model
    already stored quantized keeps its format and cannot become another."""
    if quantize is None or config.quantization == quantize:
        return config
    if config.quantization != "none":
        raise QuantizationError(
            f"{where} is stored quantized as {config.quantization} (config.json); it cannot be loaded as "
            f"{quantize}: convert the float checkpoint with quantize={quantize!r}, or load it without quantize"
        )
    return replace(config, quantization=quantize)


def _quantize_if_asked(
    params: nnx.State, graphdef: nnx.GraphDef, float_config, config, mesh, rules
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of `config`'s model: float `params` quantized when `config` says so and
    `float_config` does not; otherwise as they are."""
    if config.quantization == float_config.quantization:
        return graphdef, params
    graphdef, target = nnx.split(models.abstract(config), nnx.Param)
    quantization = Quantization.of(config)
    quantize = lambda p: quantize_params(p, target, quantization)  # noqa: E731
    if mesh is not None:
        from vishwam_jax.sharding import param_shardings

        return graphdef, jax.jit(quantize, out_shardings=param_shardings(target, mesh, rules, config))(params)
    return graphdef, jax.jit(quantize)(params)


def _random(config, dtype, mesh, rules, seed: int, unstack: bool) -> Model:
    """Seeded random weights; a quantized config gets its float model's weights, quantized."""
    float_config = replace(config, quantization="none", quantization_activations="none")

    def init() -> nnx.State:
        return nnx.state(models.build(float_config, rngs=nnx.Rngs(seed), dtype=dtype), nnx.Param)

    graphdef, abstract_state = nnx.split(models.abstract(float_config, dtype), nnx.Param)
    if mesh is not None:
        from vishwam_jax.sharding import param_shardings

        params = jax.jit(init, out_shardings=param_shardings(abstract_state, mesh, rules, float_config))()
    else:
        params = jax.jit(init)()
    graphdef, params = _quantize_if_asked(params, graphdef, float_config, config, mesh, rules)
    if unstack:
        params = stack.unstack_layers(params, delete_stacked=True)
    return Model(nnx.merge(graphdef, params), load_tokenizer(config))


def _check_layout(path: Path, abstract_state: nnx.State) -> None:
    """The stored parameter tree must be the model's, leaf for leaf and shape for shape."""
    stored = _flat(orbax_io.from_disk_tree(orbax_io.param_shapes(path)))
    expected = _flat(nnx.to_pure_dict(abstract_state))
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [
        f"{k} {tuple(stored[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(stored) & set(expected))
        if tuple(stored[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise orbax_io.CheckpointError(
            f"{path}: the stored parameters do not match the model its config.json describes ({'; '.join(parts)}); "
            "a directory written by an older vishwam_jax must be converted again"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out
