"""Read HuggingFace safetensors checkpoints one tensor at a time through memory maps.

Written against the file format (8-byte header length, JSON header, raw little-endian data) rather
than `safetensors.numpy`, because numpy has no bfloat16/float8 and the official DeepSeek-V3 release
is float8: ml_dtypes supplies those types, and a memory map keeps peak memory at one tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointFormatError(ValueError):
    """The files are not a checkpoint of the expected format (names the file and the problem)."""


class SafetensorsIndex:
    """Every tensor of a checkpoint directory (`*.safetensors`, sharded or not), opened lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointFormatError(f"no *.safetensors files in {self.directory}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in files:
            data_start, header = _read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._entries:
                    raise CheckpointFormatError(f"tensor {name!r} appears in two files ({file.name})")
                self._entries[name] = (file, data_start, info)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (pages are read only when touched)."""
        if name not in self._entries:
            raise CheckpointFormatError(f"tensor {name!r} not found in {self.directory}")
        file, data_start, info = self._entries[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointFormatError(f"{file.name}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * np.dtype(dtype).itemsize:
            raise CheckpointFormatError(f"{file.name}: tensor {name!r} size does not match its shape {shape}")
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointFormatError(f"{file}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointFormatError(f"{file}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointFormatError(f"{file}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: corrupt safetensors header (not a JSON object)")
    size = file.stat().st_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _valid_entry(info):
            raise CheckpointFormatError(f"{file}: corrupt safetensors header (bad entry for tensor {name!r})")
        if info["data_offsets"][1] + 8 + n > size:
            raise CheckpointFormatError(f"{file}: truncated (tensor {name!r} runs past the end of the file)")
    return 8 + n, header


def _valid_entry(info) -> bool:
    # Random bytes can parse as a JSON header; the entries must still have the format's fields.
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return _naturals(shape) and _naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def _naturals(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
