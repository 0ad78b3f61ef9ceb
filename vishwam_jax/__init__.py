"""vishwam_jax: DeepSeek-V3, Grok-1 and Gemma as Flax NNX modules used pure-functionally.

import vishwam_jax as vj
model = vj.load("gemma2-tiny")              # a preset: random weights, seeded
model = vj.load(vj.get_config("grok-1-tiny", num_layers=64))   # a validated, frozen config
model = vj.load("/ckpt/gemma-2b")           # a converted model directory
model.module                                # the family's nnx.Module; model.graphdef, model.params
vj.convert("/hf/gemma-2b", "/ckpt/gemma-2b")
vj.list_models()
"""

from __future__ import annotations

from vishwam_jax import models
from vishwam_jax.checkpoint.convert import convert
from vishwam_jax.loading import DEFAULT_MODEL_DIR, load
from vishwam_jax.model import Model
from vishwam_jax.presets import get_config, list_models

__all__ = ["DEFAULT_MODEL_DIR", "Model", "convert", "get_config", "list_models", "load", "models"]
