"""`load`: a preset name (random weights) or a model directory (Orbax), optionally onto a mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.model import Model
from vishwam_jax.models import family_module
from vishwam_jax.presets import UnknownModelError, get_config, list_models
from vishwam_jax.tokenizer import load_tokenizer

# The embedded demo model: a small byte-level Gemma trained on Shakespeare by scripts/train_demo.py.
DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "gemma-shakespeare"


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.startswith(".") or Path(name).exists()


def load(path_or_preset: str | Path, *, dtype=None, mesh=None, rules=None, seed: int = 0) -> Model:
    """Return a `Model`.

    path_or_preset: a preset name from `list_models()` (randomly initialised weights from `seed`)
      or a model directory written by `convert`/training.
    dtype: parameter dtype (default: float32 for presets, the stored dtype for checkpoints).
    mesh, rules: place the parameters sharded on `mesh` by the logical-axis `rules`
      (see vishwam_jax.sharding); each host then reads only its own shards.
    """
    name = str(path_or_preset)
    if not _looks_like_path(name) and name in list_models():
        config = get_config(name)
        family = family_module(config)
        dtype = dtype or jnp.float32
        init = lambda key: family.init_params(config, key, dtype)
        if mesh is not None:
            from vishwam_jax.sharding import param_shardings

            shapes = jax.eval_shape(init, jax.random.key(seed))
            init = jax.jit(init, out_shardings=param_shardings(config, shapes, mesh, rules))
        params = init(jax.random.key(seed))
        return Model(config, params, load_tokenizer(config))
    if not _looks_like_path(name):
        try:
            get_config(name)  # raises with close matches
        except UnknownModelError as err:
            raise UnknownModelError(f"{err} (and no directory named {name!r} exists)") from None
    config = orbax_io.read_config(name)
    family_module(config)
    shardings = None
    if mesh is not None:
        from vishwam_jax.sharding import param_shardings

        shardings = param_shardings(config, orbax_io.param_shapes(name), mesh, rules)
    params = orbax_io.restore_params(name, dtype=dtype, shardings=shardings)
    return Model(config, params, load_tokenizer(config, name))
