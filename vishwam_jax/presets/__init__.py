"""One registry of named model configurations (ml_collections ConfigDicts).

Each family contributes its presets from its own module; `get_config(name)` returns a fresh, unlocked
copy so callers may override fields without touching the registry.
"""

from __future__ import annotations

import difflib
from typing import Callable

import ml_collections

_REGISTRY: dict[str, Callable[[], ml_collections.ConfigDict]] = {}


def register(name: str):
    """Decorator: register a zero-argument function returning a ConfigDict under `name`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"preset {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_family_presets() -> None:
    # Imported for their registration side effect; each module owns one family's presets.
    from vishwam_jax.presets import gemma  # noqa: F401

    for optional in ("deepseek_v3", "grok1"):
        try:
            __import__(f"vishwam_jax.presets.{optional}")
        except ModuleNotFoundError as err:
            if err.name != f"vishwam_jax.presets.{optional}":
                raise


def list_models() -> list[str]:
    """Names of every registered preset, sorted."""
    _load_family_presets()
    return sorted(_REGISTRY)


class UnknownModelError(ValueError):
    pass


def get_config(name: str) -> ml_collections.ConfigDict:
    """A fresh copy of the preset `name`; raises UnknownModelError naming close matches."""
    _load_family_presets()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}")
    config = _REGISTRY[name]()
    config.name = name
    return config
