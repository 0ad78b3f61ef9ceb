"""Shared helpers for HuggingFace-format sources: config.json, rope settings, tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def read_hf_config(src: Path) -> dict:
    path = Path(src) / "config.json"
    if not path.exists():
        raise CheckpointFormatError(f"{src} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path} is not valid JSON: {err}") from None


def has_safetensors(src: Path) -> bool:
    return any(Path(src).glob("*.safetensors"))


def rope_settings(hf: dict, layer_type: str | None = None) -> dict:
    """The RoPE parameters of a config as transformers v5 (`rope_parameters`, possibly per layer
    type) or as releases and v4 (`rope_theta` + `rope_scaling`) write them."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        return dict(params)
    merged = dict(hf.get("rope_scaling") or {})
    merged.setdefault("rope_theta", hf.get("rope_theta"))
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    return merged


def copy_tokenizer_files(src: Path, writer) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            writer.copy_file(Path(src) / name)


def storage_dtype(array: np.ndarray, dtype) -> np.dtype:
    """The dtype a floating weight is stored in: the requested one, else the source's (float8 -> bf16)."""
    if dtype is not None:
        return np.dtype(dtype)
    if array.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        return np.dtype(ml_dtypes.bfloat16)
    return array.dtype


def first_id(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)
