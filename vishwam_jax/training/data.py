"""Training data: the Shakespeare demo corpus (bytes) and tokenized files (memory-mapped).

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen: the data position saved in a checkpoint is the step itself.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt.gz"


def shakespeare_bytes(path: str | Path = SHAKESPEARE) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


def train_heldout_split(tokens: np.ndarray, heldout_fraction: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """The last `heldout_fraction` of the stream is held out (a contiguous tail: no leakage of
    overlapping windows between the two)."""
    cut = int(len(tokens) * (1.0 - heldout_fraction))
    return tokens[:cut], tokens[cut:]


def token_file(path: str | Path, dtype=np.uint16) -> np.ndarray:
    """A flat binary file of token ids, memory-mapped (never read whole)."""
    return np.memmap(path, dtype=dtype, mode="r")


def load_tokens(source: str | Path, dtype: str = "uint16") -> np.ndarray:
    """The token stream named by `source`: "shakespeare" (the demo corpus as bytes), a `.npy` file
    (memory-mapped, its own dtype) or a flat binary file of `dtype` ids (memory-mapped)."""
    if str(source) == "shakespeare":
        return shakespeare_bytes()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(source)!r} is neither 'shakespeare' nor an existing token file")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype}{list(tokens.shape)}"
            )
        return tokens
    itemsize = np.dtype(dtype).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(
            f"{path}: size {path.stat().st_size} is not a multiple of {dtype} ({itemsize} bytes); wrong --data-dtype?"
        )
    return token_file(path, dtype)


def batch_at(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int = 0, rows: slice | None = None
) -> np.ndarray:
    """Random windows of seq_len + 1 tokens (inputs and shifted targets) for one step.

    rows: read only these rows of the global batch (one host's share on a multi-host run); the
      window starts are drawn for the whole batch first, so the global batch does not depend on how
      it is split across hosts.
    """
    if len(tokens) < seq_len + 2:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    return np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int32) for s in starts])


def heldout_batches(tokens: np.ndarray, batch_size: int, seq_len: int):
    """Consecutive non-overlapping windows covering the held-out stream once."""
    n = (len(tokens) - 1) // seq_len
    windows = [np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int32) for i in range(n)]
    for i in range(0, len(windows) - batch_size + 1, batch_size):
        yield np.stack(windows[i : i + batch_size])
