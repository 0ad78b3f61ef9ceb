"""Training checkpoints: Orbax `CheckpointManager` with async saves, for exact resume.

A checkpoint holds the train state (the trainable parameters, i.e. the model's nnx.State or the LoRA
adapters, the optimizer state over them, the step) and, as JSON, what
the data stream needs to continue: batches are a pure function of (seed, step), so the step and the
data settings *are* the data position. Resuming checks those settings and refuses a mismatch,
since a different batch size or seed would silently make a different run.
Checkpoint `n` is the state after `n` completed steps, i.e. the next step to run is `n`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

# Settings that determine which batches a step sees: a resumed run must keep them. (Not the mesh
# nor grad_accum: a run may resume on other hardware, and accumulation does not change the step.)
DATA_KEYS = ("data", "seed", "batch_size", "seq_len")


class ResumeMismatchError(ValueError):
    pass


class WorkdirError(ValueError):
    """The checkpoint directory cannot be created or written (the message names it and why)."""


def checkpoint_dir(directory: str | Path) -> epath.Path:
    """A local directory (made absolute) or a cloud URL such as gs://bucket/run, which multi-host
    runs need: every host writes its own shards to storage all hosts share."""
    text = str(directory)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(Path(text).expanduser().absolute())


class TrainCheckpoints:
    """CheckpointManager over items "state" (a pytree) and "meta" (JSON).

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, so the next
    step may donate (overwrite) them while the files are still being written.
    """

    def __init__(self, directory: str | Path, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(directory)
        _check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(save_every, 1), enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state of checkpoint `step`, onto the shapes, dtypes and shardings of `like`."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _check_writable(directory: epath.Path) -> None:
    """Fail before training, not at the first (asynchronous) save: a local directory must be creatable
    and writable. Cloud URLs are left to Orbax (permissions there are the bucket's)."""
    if "://" in str(directory):
        return
    local = Path(str(directory))
    probe = local / f".vishwam_write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(f"workdir {local} is not writable ({err.strerror or err})") from None


def check_resumable(saved: dict, current: dict) -> None:
    """Raise naming every data setting that differs between the checkpoint and this run."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in DATA_KEYS if saved.get(k) != current.get(k)
    ]
    for k in ("model", "init_from", "lora"):
        if saved.get(k) != current.get(k):
            diffs.append(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}")
    if diffs:
        raise ResumeMismatchError(
            "cannot resume: this run differs from the checkpoint in "
            + "; ".join(diffs)
            + " (use a new --workdir to start over)"
        )
