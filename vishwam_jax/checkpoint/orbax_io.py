"""Orbax checkpoint directories: streamed writing and (sharded) restoring.

Layout of a converted model directory (docs/checkpoint_layout.md):
    config.json         the model's config (presets' shared field names)
    params/             an Orbax PyTree checkpoint of the parameters' pure nested dict (the NNX state
                        without its Variable wrappers; list positions as lists): one zarr array per
                        leaf, no OCDBT, restorable with Orbax alone
    tokenizer.*         tokenizer files copied from the source
    VISHWAM_COMPLETE    written last; a directory without it is not a model

Orbax's own save needs the whole tree in memory, which a 671B model does not allow. So each leaf is
written by tensorstore as the zarr array Orbax would have written, slice by slice when it is large;
Orbax then writes its metadata for a tree of tiny placeholders of the same structure, and the real
arrays replace the placeholders. Everything happens in a temporary sibling directory that is renamed
into place only when complete, so an interrupted conversion never leaves a directory that loads.

An in-memory tree of (possibly sharded, possibly multi-host) jax.Arrays, e.g. after training, takes
the other road: `save_params` is collective, every process hands its shards to Orbax's own save
(tensorstore writes each shard once, from the process that owns it), and process 0 alone adds the
config, tokenizer files and the marker and renames the directory into place, after Orbax's commit.
Both roads give the same layout, so either loads with `restore_params` onto any topology.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from vishwam_jax.quantization import SCALE_NAME, MatrixDims, Quantization, keeps_stored_dtype, quantize, scale_shape

COMPLETE_MARKER = "VISHWAM_COMPLETE"


class _QuietOcdbtMerge(logging.Filter):
    """Orbax warns on every save without OCDBT (which we turn off on purpose: one zarr array per
    leaf) that it skips merging OCDBT subdirectories; the warning says nothing to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOcdbtMerge())
_CHUNK_BYTES = 64 << 20  # zarr chunk target: bounded read-modify-write when streaming slices
# Whether CheckpointWriters show a progress bar: True, False, or None (when stderr is a terminal).
# A context rather than an argument, so `convert` turns it on for every format's converter at once.
_PROGRESS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("vishwam_writer_progress", default=False)


@contextlib.contextmanager
def writer_progress(enabled: bool | None) -> Iterator[None]:
    """Within this block, a CheckpointWriter shows a tqdm bar on stderr over the parameters it writes
    (enabled None: only when stderr is a terminal)."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or corrupt (the message says which and where)."""


class CorruptCheckpointError(CheckpointError):
    """A weight file inside a model directory is damaged (truncated, empty, overwritten or missing);
    `path` is that file."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def _leaf_name(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """Chunks of at most ~64 MB that split the leading axes first, so writing one expert (or one
    row block) of a stacked tensor touches only its own chunks."""
    chunk = list(shape)
    for axis in range(len(shape)):
        while int(np.prod(chunk, dtype=np.int64)) * itemsize > _CHUNK_BYTES and chunk[axis] > 1:
            chunk[axis] = (chunk[axis] + 1) // 2
        if int(np.prod(chunk, dtype=np.int64)) * itemsize <= _CHUNK_BYTES:
            break
    return [max(c, 1) for c in chunk] or [1]


class Quantized(NamedTuple):
    """A kernel already quantized in the config's format (e.g. the FP8 release's own values and
    block scales), written as it is: `values` in the kernel's layout, `scale` as the format lays it out."""

    values: np.ndarray
    scale: np.ndarray


class CheckpointWriter:
    """Write a model directory leaf by leaf; use as a context manager so failures clean up.

    with CheckpointWriter(dst, config) as w:
        w.write(("embed",), array)
        w.write_layer(("layers", "attn", "q", "kernel"), 3, num_layers, array)   # layer 3 of a stack
        w.write_slice(("moe_layers", "experts", "up", "kernel"), (layers, experts), (3, e), expert_e)
        w.copy_file(tokenizer_path)

    With a quantized config (config.quantization), every kernel the model stores quantized is
    quantized as it is written (float arrays in, values + `kernel_scale` out, slice by slice), or
    taken as it is when handed over `Quantized`; converters need to know nothing more.
    """

    def __init__(self, dst: str | Path, config: ml_collections.ConfigDict, *, overwrite: bool = False):
        self.dst = Path(dst).expanduser().absolute()
        check_replaceable(self.dst, overwrite)
        self.config = config
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{uuid.uuid4().hex[:8]}"
        self._arrays = self.tmp / "arrays"
        self._leaves: dict[tuple, tuple[tuple[int, ...], np.dtype]] = {}
        self._stacks: dict[tuple, tuple[ts.TensorStore, set[tuple[int, ...]]]] = {}  # leaves filled by slices
        self.quantization = Quantization.of(config)
        self._quantized = _quantized_kernels(config) if self.quantization is not None else {}
        self._overwrite = overwrite
        self.tensors_written = 0  # every write, stacked layer and advance() call
        self.params_written = 0
        self._bar = None

    def __enter__(self) -> CheckpointWriter:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._arrays.mkdir(parents=True)
        enabled = _PROGRESS.get()
        if enabled or (enabled is None and sys.stderr.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(
                total=_param_count(self.config),
                desc=f"converting {self.dst.name}",
                unit="param",
                unit_scale=True,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finalize()
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._bar is not None:
                self._bar.close()

    def advance(self, params: int) -> None:
        """Count one tensor of `params` values written (a converter writing a created store itself)."""
        self.tensors_written += 1
        self.params_written += int(params)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tensors_written} tensors", refresh=False)
            self._bar.update(int(params))

    def create(self, path: tuple, shape: tuple[int, ...], dtype) -> ts.TensorStore:
        """An empty on-disk leaf to be filled slice by slice (`arr[i] = ...` or `arr[i].write(x)`)."""
        path = tuple(path)
        if path in self._leaves:
            raise ValueError(f"leaf {_leaf_name(path)} written twice")
        dtype = np.dtype(dtype)
        self._leaves[path] = (tuple(shape), dtype)
        return ts.open(
            {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self._arrays / _leaf_name(path))},
                "metadata": {
                    "shape": list(shape),
                    "chunks": _chunk_shape(tuple(shape), dtype.itemsize),
                    "dtype": _zarr_dtype(dtype),
                    "compressor": {"id": "zstd", "level": 1},
                },
            },
            create=True,
        ).result()

    def write(self, path: tuple, array: np.ndarray | Quantized) -> None:
        self.write_slice(path, (), (), array)

    def write_layer(self, path: tuple, index: int | None, count: int, array: np.ndarray | Quantized) -> None:
        """Write one layer's `array` at `index` of the stacked leaf `path` ([count, *array.shape],
        created on first use); index None writes an unstacked leaf."""
        if index is None:
            self.write(path, array)
        else:
            self.write_slice(path, (count,), (index,), array)

    def stores_quantized(self, path: tuple) -> bool:
        """Whether the leaf `path` is a kernel the config stores quantized."""
        return tuple(path) in self._quantized

    def write_slice(
        self, path: tuple, lead: tuple[int, ...], index: tuple[int, ...], array: np.ndarray | Quantized
    ) -> None:
        """Write `array` at `index` of the leaf `path` of shape [*lead, *array.shape] (created on first
        use; lead () writes the whole leaf). Finalizing checks that every index was written. A kernel
        the config stores quantized is quantized here, slice by slice: its leading dimensions (layers,
        experts) are a batch for every format, so slices quantize as the whole would. Converters hand
        every kernel over in its float layout ([..., K, N]); one the model stores K-major is
        transposed here (values and scales, kept FP8 included)."""
        path = tuple(path)
        dims = self._quantized.get(path)
        if dims is None:
            if isinstance(array, Quantized):
                raise CheckpointError(f"{_leaf_name(path)} is not a kernel this config stores quantized")
            self._write_part(path, lead, index, np.asarray(array))
            return
        q, (dims, k_major) = self.quantization, dims
        if isinstance(array, Quantized):
            values, scale = np.asarray(array.values), np.asarray(array.scale, np.float32)
            expected = scale_shape(q.format, values.shape, dims, q.block)
            if values.dtype != q.storage_dtype or scale.shape != expected:
                raise CheckpointError(
                    f"{_leaf_name(path)}: {values.dtype} values with scales {scale.shape} are not {q.format} "
                    f"(expected {q.storage_dtype} and scales {expected})"
                )
            if k_major:  # as `quantize(..., k_major=True)` lays them out
                values, scale = _k_major(values), _k_major(scale)
        else:
            values, scale = quantize(np.asarray(array), q.format, dims, q.block, xp=np, k_major=k_major)
            values, scale = np.ascontiguousarray(values), np.ascontiguousarray(scale)
        self._write_part(path, lead, index, values)
        self._write_part(path[:-1] + (SCALE_NAME,), lead, index, scale)

    def _write_part(self, path: tuple, lead: tuple[int, ...], index: tuple[int, ...], array: np.ndarray) -> None:
        if not lead:
            store = self.create(path, array.shape, array.dtype)
            store.write(array).result()
            self.advance(array.size)
            return
        if path not in self._stacks:
            self._stacks[path] = (self.create(path, (*lead, *array.shape), array.dtype), set())
        store, done = self._stacks[path]
        fits = tuple(store.shape) == (*lead, *array.shape) and len(index) == len(lead)
        if not fits or not all(0 <= i < n for i, n in zip(index, lead)):
            raise ValueError(f"{index} of {_leaf_name(path)}: shape {array.shape} does not fit {tuple(store.shape)}")
        if index in done:
            raise ValueError(f"{index} of {_leaf_name(path)} written twice")
        store[index].write(array.astype(store.dtype.numpy_dtype)).result()
        done.add(index)
        self.advance(array.size)

    def copy_file(self, src: str | Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or Path(src).name))

    def finalize(self) -> None:
        if not self._leaves:
            raise CheckpointError("no parameters were written")
        for path, (store, done) in self._stacks.items():
            lead = len(next(iter(done)))
            expected = set(np.ndindex(*store.shape[:lead]))
            if done != expected:
                absent = sorted(expected - done)
                raise CheckpointError(f"{_leaf_name(path)}: slices {absent[:8]} were never written")
        if jax.process_count() > 1:
            # Orbax's save below is collective: a writer run by one process of a multi-process job
            # would wait forever for the others.
            raise CheckpointError(
                "CheckpointWriter streams host arrays from a single process; in a multi-process (jax.distributed) "
                "job save a parameter tree with save_params, which every process calls together"
            )
        template = _tree_from_paths({p: np.zeros((1,), np.float32) for p in self._leaves})
        params_dir = self.tmp / "params"
        ocp.PyTreeCheckpointer(use_ocdbt=False).save(params_dir, template)
        for path in self._leaves:
            name = _leaf_name(path)
            shutil.rmtree(params_dir / name)
            os.replace(self._arrays / name, params_dir / name)
        shutil.rmtree(self._arrays)
        (self.tmp / "config.json").write_text(_config_json(self.config))
        (self.tmp / COMPLETE_MARKER).write_text("ok\n")
        if self.dst.exists():
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)


def _k_major(a: np.ndarray) -> np.ndarray:
    """A kernel slice (or its scales) in the float layout [..., K, N], stored K-major [..., N, K]."""
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def _quantized_kernels(config) -> dict[tuple, tuple[MatrixDims, bool]]:
    """The path, matrix dims and K-major storage of every kernel the model of `config` stores
    quantized (built abstractly: the model says which weights it quantizes, not the converter)."""
    from vishwam_jax import models
    from vishwam_jax.quantization import is_storage_dtype

    _, state = nnx.split(models.abstract(config), nnx.Param)
    return {
        tuple(path): (tuple(v.get_metadata()["matrix_dims"]), bool(v.get_metadata().get("k_major", False)))
        for path, v in nnx.to_flat_state(state)
        if is_storage_dtype(v.get_value().dtype)
    }


def _param_count(config) -> int | None:
    """Values the model of `config` holds: the bar's total (None, a bar without one, if the config
    builds no model)."""
    from vishwam_jax import models

    try:
        _, state = nnx.split(models.abstract(config), nnx.Param)
    except Exception:  # the bar is a nicety: a config the writer cannot size still converts
        return None
    return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree_util.tree_leaves(state))


def check_replaceable(dst: Path, overwrite: bool) -> None:
    """A destination may be replaced only with overwrite, and only when it is a model directory (or
    empty): overwrite never deletes a user's other files."""
    if not dst.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    if not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory; refusing to replace it")
    if any(dst.iterdir()) and not (dst / COMPLETE_MARKER).exists():
        raise CheckpointError(
            f"{dst} exists and is not a vishwam_jax model directory (no {COMPLETE_MARKER}); refusing to delete "
            "its contents: choose another destination"
        )


def _config_json(config) -> str:
    from vishwam_jax.presets import to_dict

    return json.dumps(to_dict(config), indent=2)


def to_disk_tree(pure: Any) -> Any:
    """An NNX pure dict (list positions as int keys) as the tree stored on disk (lists)."""
    if isinstance(pure, dict):
        if pure and all(isinstance(k, int) for k in pure):
            return [to_disk_tree(pure[i]) for i in sorted(pure)]
        return {k: to_disk_tree(v) for k, v in pure.items()}
    return pure


def from_disk_tree(tree: Any) -> Any:
    """The stored tree back in NNX's pure-dict form (lists as int-keyed dicts)."""
    if isinstance(tree, (list, tuple)):
        return {i: from_disk_tree(v) for i, v in enumerate(tree)}
    if isinstance(tree, dict):
        return {k: from_disk_tree(v) for k, v in tree.items()}
    return tree


def _zarr_dtype(dtype: np.dtype) -> str:
    # ml_dtypes' types have no numpy type string (theirs reads as raw bytes, "|V1"); tensorstore's
    # zarr driver, and so Orbax, name them.
    if dtype in (np.dtype(jnp.bfloat16), np.dtype(jnp.float8_e4m3fn)):
        return dtype.name
    return dtype.str


def _tree_from_paths(leaves: dict[tuple, Any]) -> Any:
    """Rebuild nested dicts (string keys) and lists (int keys) from flat paths."""
    root: dict = {}
    for path, value in leaves.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(k, int) for k in node):
            if sorted(node) != list(range(len(node))):
                raise ValueError(f"list indices {sorted(node)} are not contiguous")
            return [listify(node[i]) for i in range(len(node))]
        return {k: listify(v) for k, v in node.items()}

    return listify(root)


def save_params(
    dst: str | Path, params: Any, config: ml_collections.ConfigDict, *, overwrite: bool = False, files: tuple = ()
) -> None:
    """Save an in-memory parameter tree (jax.Arrays, sharded or not, or host numpy arrays) as a model
    directory, e.g. after training.

    Collective in a multi-process (jax.distributed) job: every process calls it with the same tree of
    global arrays and the same arguments, and `dst` must be on storage all processes share. Each
    process writes only the shards it owns (one replica of each), so no host ever holds the whole
    model; process 0 writes config.json, copies `files` and renames the directory into place. Returns
    on every process once the directory is complete.
    """
    dst = Path(dst).expanduser().absolute()
    if isinstance(params, nnx.State):  # store its pure nested dict, stacked layers as stacked arrays
        from vishwam_jax.models.stack import restack_layers

        params = nnx.to_pure_dict(restack_layers(params))
    params = to_disk_tree(params)
    leaves = list(_flatten_with_paths(params))  # refuses node types a model directory cannot hold
    if not leaves:
        raise CheckpointError("no parameters were written")
    check_replaceable(dst, overwrite)
    primary = jax.process_index() == 0
    tmp = dst.parent / f".{dst.name}.partial-{_shared_token()}"
    try:
        if primary:
            tmp.mkdir(parents=True)
        _barrier(f"vishwam_save_params_mkdir_{tmp.name}")
        if not tmp.is_dir():
            raise CheckpointError(
                f"process {jax.process_index()} does not see {tmp}, which process 0 created: a multi-process save "
                "needs a destination on storage every host shares"
            )
        # Chunks of at most ~64 MB inside each shard: a later restore onto another sharding reads
        # little more than its own slices.
        save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
        checkpointer.save(tmp / "params", args=ocp.args.PyTreeSave(params, save_args=save_args))
        checkpointer.close()
        # Orbax has committed every process's shards before its save returns anywhere.
        if primary:
            for f in files:
                shutil.copyfile(f, tmp / Path(f).name)
            (tmp / "config.json").write_text(_config_json(config))
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)  # the only step that makes `dst` a model directory
        _barrier(f"vishwam_save_params_done_{tmp.name}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shared_token() -> str:
    """A random name part that every process agrees on (process 0's)."""
    token = np.frombuffer(uuid.uuid4().bytes[:4], np.int32).copy()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(np.asarray(token)[0]) & 0xFFFFFFFF:08x}"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _flatten_with_paths(tree: Any) -> Iterator[tuple[tuple, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for keypath, leaf in flat:
        yield tuple(_key_of(k) for k in keypath), leaf


def _key_of(k) -> str | int:
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    raise TypeError(f"unsupported pytree node {k!r} in parameters")


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if not (path / COMPLETE_MARKER).exists() or not (path / "config.json").exists():
        raise CheckpointError(
            f"{path} is not a complete vishwam_jax model directory (no {COMPLETE_MARKER}/config.json; "
            "convert official checkpoints first with `python -m vishwam_jax.convert SRC DST`)"
        )
    return path


def read_config(path: str | Path) -> ml_collections.FrozenConfigDict:
    from vishwam_jax.presets import ConfigError, from_dict

    path = check_model_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'config.json'} is corrupt: {err}") from None
    try:
        return from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(
            f"{path / 'config.json'}: {err} (a model directory written by an older vishwam_jax: convert it again)"
        ) from None


def param_shapes(path: str | Path) -> Any:
    """The parameter tree of a model directory as ShapeDtypeStructs (reads only zarr metadata)."""
    params_dir = check_model_dir(path) / "params"
    try:
        meta = json.loads((params_dir / "_METADATA").read_text())["tree_metadata"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{params_dir} is corrupt: {err}") from None
    leaves = {}
    for entry in meta.values():
        path_keys = tuple(int(k["key"]) if k["key_type"] == 1 else k["key"] for k in entry["key_metadata"])
        zarray = params_dir / _leaf_name(path_keys) / ".zarray"
        try:
            z = json.loads(zarray.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{zarray}: missing or corrupt array metadata ({err})") from None
        dtype = jnp.bfloat16 if z["dtype"] == "bfloat16" else np.dtype(z["dtype"])
        leaves[path_keys] = jax.ShapeDtypeStruct(tuple(z["shape"]), dtype)
    return _tree_from_paths(leaves)


def restore_params(path: str | Path, *, dtype=None, shardings: Any = None) -> Any:
    """Restore parameters, casting floating leaves to `dtype` (quantized values and their float32
    scales stay as stored: vishwam_jax/quantization).

    `shardings`: a tree of jax.sharding.Sharding matching the parameters (or None for one device);
    Orbax then reads on each host only the slices of its own devices.
    """
    shapes = param_shapes(path)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)

    def target(key, s, sharding):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key)
        cast = dtype is not None and jnp.issubdtype(s.dtype, jnp.floating) and not keeps_stored_dtype(name, s.dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype if cast else s.dtype, global_shape=s.shape)

    restore_args = jax.tree_util.tree_map_with_path(target, shapes, shardings)
    # A failed read's siblings are abandoned, and their late callbacks can print as soon as Orbax
    # closes its event loop, before the failure reaches this function: filter from the start.
    already_filtered = _silence_abandoned_reads()
    try:
        params = ocp.PyTreeCheckpointer().restore(
            Path(path).absolute() / "params", args=ocp.args.PyTreeRestore(restore_args=restore_args)
        )
    except Exception as err:  # Orbax wraps tensorstore's read errors in a bare Exception
        failure = _restore_failure(path, err)
        if failure is None:
            raise
    else:
        if not already_filtered:  # nothing was abandoned: the process's hook as it was
            sys.unraisablehook = _hook_before_silencing
        return params
    # Raised outside the handler, so the failure does not keep Orbax's error (and its frames) alive.
    _collect_abandoned_reads()
    raise failure


def _restore_failure(path, err: Exception) -> CheckpointError | None:
    damaged = _damaged_file(err)
    if damaged is not None:
        file, problem = damaged
        return CorruptCheckpointError(
            f"{file}: damaged weight file ({problem}); convert or save the model directory again", file
        )
    if isinstance(err, (ValueError, OSError)):
        return CheckpointError(f"could not restore {path}: {_first_line(err)}")
    return None


def _collect_abandoned_reads(timeout_s: float = 2.0) -> None:
    """Orbax reads all arrays concurrently; when one read fails, the others are dropped mid-flight.
    Two kinds of noise follow, at whatever moment the garbage collector or a background read gets
    to them: each dropped coroutine prints "Exception ignored in <coroutine ...>" with a tensorstore
    spec dump, and each read that completes after Orbax closed its event loop prints "Exception
    ignored in: None ... Event loop is closed" from its done-callback. Both are silenced for the rest
    of the process (the error being raised is the one that matters), and the coroutines are collected
    here as soon as their reads let go of them (or `timeout_s` passes)."""
    _silence_abandoned_reads()
    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()
        if time.monotonic() > deadline or not any(_is_orbax_coroutine(o) for o in gc.get_objects()):
            break
        time.sleep(0.01)


_hook_before_silencing = sys.unraisablehook


def _silence_abandoned_reads() -> bool:
    """Install the filter; whether it was installed already (after an earlier failed restore)."""
    global _hook_before_silencing
    if sys.unraisablehook is _unraisable_hook_without_abandoned_reads:
        return True
    _hook_before_silencing = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook_without_abandoned_reads
    return False


def _unraisable_hook_without_abandoned_reads(unraisable) -> None:
    if not _is_abandoned_read_noise(unraisable):
        _hook_before_silencing(unraisable)


def _is_abandoned_read_noise(unraisable) -> bool:
    if _is_orbax_coroutine(unraisable.object):
        return True
    late_callback = (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )
    return late_callback


def _is_orbax_coroutine(obj) -> bool:
    return inspect.iscoroutine(obj) and "orbax" in getattr(getattr(obj, "cr_code", None), "co_filename", "")


# tensorstore names the file it could not read or decode in double quotes, e.g.
#   FAILED_PRECONDITION: Error reading local file "/m/params/embed.embedding/0.0": Truncated Zstd-compressed stream
#   NOT_FOUND: chunk {0, 0} stored at local file "/m/params/embed.embedding/0.0" is missing
_TENSORSTORE_FILE = re.compile(r'file "(?P<file>[^"]+)"(?::\s*(?P<problem>.*))?')


def _damaged_file(err: BaseException | None) -> tuple[str, str] | None:
    """(file, problem) from the first error in `err`'s chain that names a file tensorstore failed on."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        line = _first_line(err)
        m = _TENSORSTORE_FILE.search(line)
        if m:
            problem = m["problem"] or ("missing" if "missing" in line else re.sub(r"^[A-Z_]+: ", "", line))
            return m["file"], problem.strip()[:200]
        err = err.__cause__ or err.__context__
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
