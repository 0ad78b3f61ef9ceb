"""Named model configurations: frozen ml_collections configs with one vocabulary for every family.

Shared ideas have shared names (`d_model`, `num_layers`, `num_heads`, `num_kv_heads`, `head_dim`,
`ffn_dim`, `moe_ffn_dim`, `num_experts`, `num_experts_per_token`, `norm_eps`, `rope_theta`,
`max_seq_len`, ...); a field exists only in the families that read it. Each family module registers
its presets and a `base()` holding every field its model reads, plus a `finalize` that derives the
dependent fields (Gemma's per-layer attention kinds) and checks the values.

    get_config("gemma2-tiny", num_layers=8)   # a validated, frozen copy; unknown fields are an error
    replace(config, remat_policy="full")      # the same for an existing config
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import ml_collections

from vishwam_jax.quantization.formats import ACTIVATION_FORMATS

Config = ml_collections.FrozenConfigDict


class UnknownModelError(ValueError):
    pass


class ConfigError(ValueError):
    """A config field that does not exist for the family, or a value the model cannot run."""


@dataclasses.dataclass(frozen=True)
class Family:
    base: Callable[[], ml_collections.ConfigDict]  # every field the family reads, with defaults
    finalize: Callable[[ml_collections.ConfigDict], None]  # derive dependent fields; raise ConfigError
    derived: tuple[str, ...] = ()  # fields finalize computes (not settable)


_PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}
_FAMILIES: dict[str, Family] = {}

# Fields of every family.
COMMON_FIELDS = (
    "name", "family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "activation", "norm_eps", "rope_theta", "max_seq_len", "pad_token_id", "eos_token_id", "bos_token_id",
    "tokenizer", "remat_policy", "scan_unroll", "quantization", "quantization_block", "quantization_activations",
)  # fmt: skip


def register(name: str):
    """Decorator: register a zero-argument function returning a ConfigDict under `name`."""

    def wrap(fn):
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        _PRESETS[name] = fn
        return fn

    return wrap


def register_family(family: str, spec: Family) -> None:
    _FAMILIES[family] = spec


def _load_family_presets() -> None:
    # Imported for their registration side effect; each module owns one family's presets.
    from vishwam_jax.presets import deepseek_v3, gemma, grok1  # noqa: F401


def list_models() -> list[str]:
    """Names of every registered preset, sorted."""
    _load_family_presets()
    return sorted(_PRESETS)


def _family(name: str) -> Family:
    _load_family_presets()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def _apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> Config:
    """Set `overrides` on a fresh base config, derive, check and freeze."""
    family = _family(config.family)
    for key, value in overrides.items():
        if key in family.derived:
            raise ConfigError(f"{key} is derived from other fields of a {config.family} config and cannot be set")
        if key not in config:
            close = difflib.get_close_matches(key, list(config.keys()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config field {key!r} for family {config.family}{hint}")
        config[key] = tuple(value) if isinstance(value, list) else value
    family.finalize(config)
    _check_common(config)
    return Config(config)


def _check_common(c: ml_collections.ConfigDict) -> None:
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
        value = c.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{field} must be a positive integer, got {value!r}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"num_heads={c.num_heads} is not a multiple of num_kv_heads={c.num_kv_heads}")
    from vishwam_jax.models.remat import POLICY_NAMES

    if c.remat_policy not in POLICY_NAMES:
        raise ConfigError(f"remat_policy {c.remat_policy!r} is not one of {', '.join(POLICY_NAMES)}")
    if not isinstance(c.scan_unroll, int) or c.scan_unroll < 1:
        raise ConfigError(f"scan_unroll must be a positive integer (layers per scan iteration), got {c.scan_unroll!r}")
    from vishwam_jax.quantization import FORMATS

    if c.quantization not in ("none", *FORMATS):
        raise ConfigError(f"quantization {c.quantization!r} is not one of none, {', '.join(FORMATS)}")
    block = c.quantization_block
    if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)):
        raise ConfigError(f"quantization_block must be two positive integers [rows, columns], got {block!r}")
    if c.quantization_activations not in ACTIVATION_FORMATS:
        raise ConfigError(
            f"quantization_activations {c.quantization_activations!r} is not one of {', '.join(ACTIVATION_FORMATS)}"
        )
    if c.quantization_activations == "fp8" and c.quantization != "fp8":
        raise ConfigError(f"quantization_activations='fp8' needs quantization='fp8', not {c.quantization!r}")


def get_config(name: str, **overrides: Any) -> Config:
    """The preset `name` with `overrides` applied: validated and frozen.

    Raises UnknownModelError (naming close matches) for an unknown preset and ConfigError for an
    unknown field or an impossible value.
    """
    _load_family_presets()
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; known: {', '.join(sorted(_PRESETS))}")
    config = _PRESETS[name]()
    config.name = name
    return _apply(config, overrides)


def make_config(family_name: str, /, **fields: Any) -> Config:
    """A config of the family `family_name` from its base defaults and `fields` (converters,
    config.json files)."""
    config = _family(family_name).base()
    return _apply(config, {k: v for k, v in fields.items() if k != "family"})


def from_dict(fields: dict[str, Any]) -> Config:
    """A config saved by `to_dict` (a model directory's config.json); derived fields are recomputed."""
    if "family" not in fields:
        raise ConfigError("config has no 'family' field")
    derived = _family(fields["family"]).derived
    return make_config(fields["family"], **{k: v for k, v in fields.items() if k not in derived})


def replace(config: Config | ml_collections.ConfigDict, **overrides: Any) -> Config:
    """A validated, frozen copy of `config` with `overrides` applied."""
    derived = _family(config.family).derived
    fields = {k: v for k, v in _plain(config).items() if k not in derived}
    fields.update(overrides)
    return make_config(config.family, **fields)


def to_dict(config: Config | ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain JSON-able fields (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _plain(config).items()}


def _plain(config) -> dict[str, Any]:
    return config.as_configdict().to_dict() if isinstance(config, Config) else config.to_dict()
