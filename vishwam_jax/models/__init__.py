"""Model families. Each family module exposes the same functional interface:

    init_params(config, key, dtype) -> params pytree
    init_cache(config, batch, max_len, dtype) -> cache pytree (with "pos": [b] next position per row)
    forward(params, tokens, config, *, cache=None, lengths=None, logit_positions=None) -> (logits, cache)
"""

from __future__ import annotations

import importlib
from types import ModuleType

_FAMILY_MODULES = {
    "gemma": "vishwam_jax.models.gemma",
    "deepseek_v3": "vishwam_jax.models.deepseek_v3",
    "grok1": "vishwam_jax.models.grok1",
}


def family_module(config) -> ModuleType:
    family = config.family
    if family not in _FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(_FAMILY_MODULES)}")
    return importlib.import_module(_FAMILY_MODULES[family])
