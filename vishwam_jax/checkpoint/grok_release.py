"""The official Grok-1 release (xai-org/grok-1, `ckpt-0/tensor{i:05d}_000`) -> model directory.

WARNING: the release's files are Python pickles, and unpickling can run arbitrary code. Convert only
checkpoints from a source you trust. This reader unpickles through an allowlist (numpy array
reconstruction, the bfloat16 dtype and the release's `QuantizedWeight8bit` dataclass) and refuses
anything else, but that is a safeguard, not a guarantee.

The format (shared/docs/grok1.md): leaf i of the Haiku parameter dict, flattened by jax.tree_util, is
the pickled file `ckpt-0/tensor{i:05d}_000`; module paths are in lexicographic string order
(`decoder_layer_10` sorts before `decoder_layer_2`), 2 + 12 * num_layers leaves. Weights are [in, out].
Large matrices are `QuantizedWeight8bit(weight: int8, scales)`, dense = weight * scales. The scales
broadcast against the weight, or tile it in blocks: the release's row-parallel layers (attention
output, expert down projection) carry one row of scales per block of input rows ([8, d] for
[6144, d]), so each scale axis is accepted when its size divides the weight's.

The release ships no config file: `config` names a preset and/or overrides in the release's own
field names (mapped onto the presets' shared vocabulary), and every leaf's shape is checked against
it. Each file is unpickled on its own and written out before the next is read, so memory holds one
leaf and its converted copy (at most one layer's expert stack: 1.6 GB int8 in, 3.2 GB bfloat16 out).

Written layout (docs/checkpoint_layout.md): the module attribute paths of models/grok1.py, each layer
at its index of the stacked `layers` leaves (presets.grok1.layer_slot), e.g.
    transformer/decoder_layer_10/moe/linear/w   ->  layers.experts.gate.kernel[10]     [L, e, d, f]
    transformer/decoder_layer_3/rms_norm/scale  ->  layers.attn_norm.scale[3]          [L, d]

quantize="int8" keeps the int8 weights in our int8 format (`kernel` int8 + `kernel_scale` float32 per
output channel, vishwam_jax/quantization), for the model's weight-only int8 matmuls (which scale the
matmul's output); the config then says quantization="int8". Scales that vary along a contracted
(input) axis cannot be applied to the output, so those weights - in the release the attention output
and the expert down projections - are requantized per output channel from their exact dense values:
one more rounding, of at most half the new int8 step per weight. quantize="fp8" quantizes the exact
dense values in fp8 blocks. Either way one expert is processed at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from vishwam_jax.checkpoint.orbax_io import CheckpointWriter, Quantized
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError
from vishwam_jax.presets import Config, ConfigError, get_config, replace
from vishwam_jax.presets.grok1 import ffn_size, layer_slot
from vishwam_jax.quantization import check_format

logger = logging.getLogger(__name__)

PICKLE_WARNING = (
    "Grok-1 release checkpoints are Python pickles, and unpickling can run code: convert only checkpoints "
    "from a source you trust."
)

LEAF_FILE = re.compile(r"tensor(\d{5})_(\d{3})")

# Overrides accepted by `convert(config={...})`, in the release's names (run.py / model.py), and the
# fields of our config (the presets' shared vocabulary) they set.
RELEASE_FIELDS = {
    "vocab_size": "vocab_size",
    "emb_size": "d_model",
    "num_layers": "num_layers",
    "num_q_heads": "num_heads",
    "num_kv_heads": "num_kv_heads",
    "key_size": "head_dim",
    "num_experts": "num_experts",
    "num_selected_experts": "num_experts_per_token",
    "widening_factor": "widening_factor",  # sets moe_ffn_dim by the release's rule (presets.grok1.ffn_size)
    "embedding_multiplier_scale": "embedding_multiplier_scale",
    "output_multiplier_scale": "output_multiplier_scale",
    "attn_output_multiplier": "attn_output_multiplier",
}


class GrokConfigError(CheckpointFormatError):
    """The configuration given for a release checkpoint (which ships none) is not a valid Grok-1 one."""


@dataclasses.dataclass
class QuantizedWeight8bit:
    """The release's int8 weight: dense = weight.astype(scales.dtype) * scales."""

    weight: np.ndarray
    scales: np.ndarray


# numpy's own array-unpickling functions, taken from its reductions rather than private imports:
# protocols <= 4 rebuild an array with _reconstruct + setstate, protocol 5 with _frombuffer.
_RECONSTRUCT = np.zeros(1).__reduce_ex__(4)[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickles written by numpy < 2
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
}


class _ReleaseUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and QuantizedWeight8bit: any other global is refused by name."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointFormatError(
                f"refusing to unpickle {module}.{name}: a Grok-1 release leaf holds only numpy arrays and "
                "QuantizedWeight8bit (this file is not from the release, or was tampered with)"
            ) from None

    def persistent_load(self, pid):
        raise CheckpointFormatError("refusing a pickle with persistent ids (not a Grok-1 release leaf)")


def _checked_array(a: Any, what: str, *, floating: bool) -> np.ndarray:
    if type(a) is not np.ndarray:
        raise CheckpointFormatError(f"{what} is a {type(a).__name__}, not a numpy array")
    ok = (a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16) if floating else a.dtype == np.int8
    if not ok:
        raise CheckpointFormatError(f"{what} has dtype {a.dtype}, expected {'a float type' if floating else 'int8'}")
    return a


def read_leaf(path: Path) -> np.ndarray | QuantizedWeight8bit:
    """Unpickle one release leaf file (allowlisted classes only) and check what it holds."""
    with open(path, "rb") as f:
        try:
            obj = _ReleaseUnpickler(f).load()
        except CheckpointFormatError as err:
            raise CheckpointFormatError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointFormatError(
                f"{path}: corrupt or not a Grok-1 release leaf ({type(err).__name__}: {err})"
            ) from None
    if isinstance(obj, QuantizedWeight8bit):
        weight = _checked_array(getattr(obj, "weight", None), f"{path}: QuantizedWeight8bit.weight", floating=False)
        scales = _checked_array(getattr(obj, "scales", None), f"{path}: QuantizedWeight8bit.scales", floating=True)
        return QuantizedWeight8bit(weight, scales)
    return _checked_array(obj, str(path), floating=True)


# -- the leaf map ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
    index: int  # the file tensor{index:05d}_000
    name: str  # module path / parameter name, as in the release
    dest: tuple  # our parameter path (quantized: the `kernel`, with `kernel_scale` beside it)
    layer: int | None  # index on the stacked axis of `dest` (None: an unstacked leaf)
    shape: tuple[int, ...]  # as stored in the release
    target: tuple[int, ...]  # one layer as stored by us (heads split out)
    contracted: tuple[int, ...] = ()  # input axes of a matmul weight (release layout); () for others
    target_contracted: tuple[int, ...] = ()  # the same axes in our layout

    @property
    def is_matmul(self) -> bool:
        return bool(self.contracted)


def leaf_plan(config) -> list[Leaf]:
    """Every release leaf in file order: module paths sorted as strings, as jax.tree_util sorts the
    keys of Haiku's flat {module_path: {param: array}} dict."""
    d, h, kh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    e, f, v = config.num_experts, config.moe_ffn_dim, config.vocab_size
    # release module -> (param, our path, layer, release shape, our shape, contracted: release, ours)
    modules: dict[str, tuple] = {
        "language_model/in_out_embed": ("embeddings", ("embed", "embedding"), None, (v, d), (v, d), (), ()),
        "language_model/rms_norm": ("scale", ("final_norm", "scale"), None, (d,), (d,), (), ()),
    }
    for n in range(config.num_layers):
        p = f"transformer/decoder_layer_{n}/"
        L, i = layer_slot(config, n)
        modules |= {
            p + "moe/linear": ("w", L + ("experts", "gate", "kernel"), i, (e, d, f), (e, d, f), (1,), (1,)),
            p + "moe/linear_1": ("w", L + ("experts", "down", "kernel"), i, (e, f, d), (e, f, d), (1,), (1,)),
            p + "moe/linear_v": ("w", L + ("experts", "up", "kernel"), i, (e, d, f), (e, d, f), (1,), (1,)),
            p + "multi_head_attention/key": (
                "w",
                L + ("attn", "k", "kernel"),
                i,
                (d, kh * hd),
                (d, kh, hd),
                (0,),
                (0,),
            ),
            p + "multi_head_attention/linear": (
                "w",
                L + ("attn", "o", "kernel"),
                i,
                (h * hd, d),
                (h, hd, d),
                (0,),
                (0, 1),
            ),
            p + "multi_head_attention/query": (
                "w",
                L + ("attn", "q", "kernel"),
                i,
                (d, h * hd),
                (d, h, hd),
                (0,),
                (0,),
            ),
            p + "multi_head_attention/value": (
                "w",
                L + ("attn", "v", "kernel"),
                i,
                (d, kh * hd),
                (d, kh, hd),
                (0,),
                (0,),
            ),
            p + "rms_norm": ("scale", L + ("attn_norm", "scale"), i, (d,), (d,), (), ()),
            p + "rms_norm_1": ("scale", L + ("post_attn_norm", "scale"), i, (d,), (d,), (), ()),
            p + "rms_norm_2": ("scale", L + ("moe_norm", "scale"), i, (d,), (d,), (), ()),
            p + "rms_norm_3": ("scale", L + ("post_moe_norm", "scale"), i, (d,), (d,), (), ()),
            p + "router": ("w", L + ("router", "kernel"), i, (d, e), (d, e), (), ()),
        }
    return [
        Leaf(i, f"{module}/{param}", dest, layer, shape, target, contracted, target_contracted)
        for i, (module, (param, dest, layer, shape, target, contracted, target_contracted)) in enumerate(
            sorted(modules.items())
        )
    ]


# -- configuration --------------------------------------------------------------------------------
def resolve_config(config: str | Mapping | ml_collections.ConfigDict = "grok-1") -> Config:
    """A validated, frozen Grok-1 config from a preset name, a JSON object string, a config, or a dict
    of overrides in the release's field names (optionally with "preset": the base, default grok-1)."""
    if isinstance(config, ml_collections.ConfigDict):  # frozen or not
        _check_family(config)
        return _validated(lambda: replace(config))
    if isinstance(config, str) and config.lstrip().startswith("{"):
        try:
            overrides = json.loads(config)
        except json.JSONDecodeError as err:
            raise GrokConfigError(f"config {config!r} is not valid JSON: {err}") from None
        return resolve_config(overrides)
    if isinstance(config, str):
        c = get_config(config)
        _check_family(c)
        return c
    if not isinstance(config, Mapping):
        raise GrokConfigError(f"config must be a preset name, a dict or a ConfigDict, not {type(config).__name__}")
    overrides = dict(config)
    base_name = overrides.pop("preset", "grok-1")
    unknown = sorted(set(overrides) - set(RELEASE_FIELDS))
    if unknown:
        raise GrokConfigError(
            f"unknown Grok-1 config field(s) {', '.join(unknown)}; the release's fields are: "
            f"{', '.join(RELEASE_FIELDS)}"
        )
    base = get_config(base_name)
    _check_family(base)
    fields = {}
    for key, value in overrides.items():
        field = RELEASE_FIELDS[key]
        kind = type(base[field])
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value <= 0
            or (kind is int and value != int(value))
        ):
            raise GrokConfigError(
                f"config field {key} must be a positive {'integer' if kind is int else 'number'}, not {value!r}"
            )
        fields[field] = kind(value)
    get = lambda field: fields.get(field, base[field])  # noqa: E731
    # Checked here to name the release's fields in the message.
    if get("num_heads") % get("num_kv_heads"):
        raise GrokConfigError(
            f"num_q_heads ({get('num_heads')}) must be a multiple of num_kv_heads ({get('num_kv_heads')})"
        )
    if get("num_experts_per_token") > get("num_experts"):
        raise GrokConfigError(
            f"num_selected_experts ({get('num_experts_per_token')}) exceeds num_experts ({get('num_experts')})"
        )
    # The release derives the expert width from emb_size and widening_factor.
    fields["moe_ffn_dim"] = ffn_size(get("d_model"), get("widening_factor"))
    if overrides:
        fields["name"] = f"{base_name} ({', '.join(f'{k}={v}' for k, v in overrides.items())})"
    return _validated(lambda: replace(base, **fields))


def _check_family(c) -> None:
    if c.get("family") != "grok1":
        raise GrokConfigError(f"config {c.get('name')!r} is a {c.get('family')!r} model, not Grok-1")


def _validated(make) -> Config:
    try:
        return make()
    except ConfigError as err:
        raise GrokConfigError(f"invalid Grok-1 config: {err}") from None


# -- layout ---------------------------------------------------------------------------------------
def _ckpt_dir(src: Path) -> Path | None:
    for candidate in (src / "ckpt-0", src):
        if candidate.is_dir() and any(LEAF_FILE.fullmatch(p.name) for p in candidate.iterdir()):
            return candidate
    return None


def detect(src: str | Path) -> bool:
    """A directory holding the release's `ckpt-0/` (or that directory itself)."""
    return _ckpt_dir(Path(src)) is not None


def leaf_files(src: str | Path, expected: int) -> tuple[Path, list[Path]]:
    """The release's leaf files in index order, refusing anything that is not exactly that layout
    (no unpickling happens before the whole directory has passed)."""
    ckpt = _ckpt_dir(Path(src))
    if ckpt is None:
        raise CheckpointFormatError(f"{src} is not the Grok-1 release layout (no ckpt-0/tensorNNNNN_000 files)")
    found: dict[int, Path] = {}
    for p in sorted(ckpt.iterdir()):
        m = LEAF_FILE.fullmatch(p.name)
        if m is None or not p.is_file():
            raise CheckpointFormatError(
                f"{ckpt} is not the Grok-1 release layout: unexpected entry {p.name!r} "
                "(only tensorNNNNN_000 files belong there; refusing to unpickle anything from it)"
            )
        if m.group(2) != "000":
            raise CheckpointFormatError(
                f"{p}: shard {m.group(2)} - the release has one shard per leaf (_000); multi-shard layouts "
                "are not supported"
            )
        found[int(m.group(1))] = p
    missing = sorted(set(range(expected)) - set(found))
    extra = sorted(set(found) - set(range(expected)))
    if missing or extra:
        raise CheckpointFormatError(
            f"{ckpt} holds {len(found)} leaves, the config expects {expected} (2 + 12 per layer)"
            + (f"; missing {_ranges(missing)}" if missing else "")
            + (f"; unexpected {_ranges(extra)}" if extra else "")
            + " - pass the release's config (e.g. config={'num_layers': N}) if this is not the 64-layer grok-1"
        )
    return ckpt, [found[i] for i in range(expected)]


def _ranges(xs: list[int]) -> str:
    shown = ", ".join(f"tensor{i:05d}_000" for i in xs[:5])
    return shown + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")


def _tokenizer_file(src: Path, ckpt: Path) -> Path | None:
    """The release ships tokenizer.model at its root, beside ckpt-0/."""
    for candidate in (
        src / "tokenizer.model",
        ckpt / "tokenizer.model",
        ckpt.parent / "tokenizer.model",
        src.parent / "tokenizer.model",
    ):
        if candidate.is_file():
            return candidate
    return None


# -- int8 handling --------------------------------------------------------------------------------
def block_scales(leaf: Leaf, scales: np.ndarray) -> np.ndarray:
    """`scales` with the weight's rank, each axis of size 1, of the weight's size, or a divisor of
    it (one scale per block of consecutive indices); raises naming the leaf otherwise."""
    shape = leaf.shape
    if scales.ndim > len(shape):
        raise CheckpointFormatError(
            f"leaf {leaf.index} ({leaf.name}): scales {scales.shape} have more axes than the weight {shape}"
        )
    scales = scales.reshape((1,) * (len(shape) - scales.ndim) + scales.shape)
    for s, w in zip(scales.shape, shape):
        if s == 0 or w % s:
            raise CheckpointFormatError(
                f"leaf {leaf.index} ({leaf.name}): scales {scales.shape} neither broadcast against nor tile "
                f"the weight {shape}"
            )
    return scales


def dequantize_blocks(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 weight * scales, where each scale covers a block of the weight (same rank)."""
    split = [n for w, s in zip(weight.shape, scales.shape) for n in (s, w // s)]
    spread = [n for s in scales.shape for n in (s, 1)]
    return (weight.reshape(split).astype(np.float32) * scales.astype(np.float32).reshape(spread)).reshape(weight.shape)


def spread_scales(scales: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each block's scale over its block, giving scales of `shape` (same rank)."""
    for axis, n in enumerate(shape):
        scales = np.repeat(scales, n // scales.shape[axis], axis=axis)
    return scales


def _slices(leaf: Leaf) -> list[tuple[int, ...]]:
    """Expert stacks are processed one expert at a time (bounded memory); other leaves whole."""
    return [(e,) for e in range(leaf.shape[0])] if len(leaf.shape) == 3 else [()]


def _scales_of_slice(scales: np.ndarray, leaf: Leaf, sl: tuple[int, ...]) -> np.ndarray:
    if not sl:
        return scales
    return scales[sl[0] // (leaf.shape[0] // scales.shape[0])]


def _fields_of(leaf: Leaf) -> str:
    """The config fields that decide a leaf's shape, for error messages."""
    if "in_out_embed" in leaf.name:
        return "vocab_size, emb_size"
    if "/moe/" in leaf.name:
        return "num_experts, emb_size, widening_factor"
    if "multi_head_attention" in leaf.name:
        return "emb_size, num_q_heads, num_kv_heads, key_size"
    if "router" in leaf.name:
        return "emb_size, num_experts"
    return "emb_size"


def _write(writer: CheckpointWriter, config, leaf: Leaf, sl: tuple[int, ...], array: np.ndarray | Quantized) -> None:
    """Slice `sl` of a leaf (one expert, or () for all of it) at its layer's index of the stacked leaf
    (or the unstacked leaf); the writer quantizes the kernels the config stores quantized."""
    if leaf.layer is None:
        writer.write(leaf.dest, array)
    else:
        lead = (config.num_layers, *leaf.target[: len(sl)])
        writer.write_slice(leaf.dest, lead, (leaf.layer, *sl), array)


def _write_quantized(writer: CheckpointWriter, config, leaf: Leaf, q: QuantizedWeight8bit, dtype) -> None:
    if q.weight.shape != leaf.shape:
        raise CheckpointFormatError(
            f"leaf {leaf.index} ({leaf.name}): int8 weight shape {q.weight.shape} does not match the config "
            f"({leaf.shape}); check the config's {_fields_of(leaf)}"
        )
    scales = block_scales(leaf, q.scales)
    quantized = writer.stores_quantized(leaf.dest)
    contracted = tuple(a - len(_slices(leaf)[0]) for a in leaf.contracted)  # axes within one slice
    for sl in _slices(leaf):  # one expert at a time: no float32 copy of a whole stack
        w, s = q.weight[sl], _scales_of_slice(scales, leaf, sl)
        target = leaf.target[len(sl) :]
        if quantized and config.quantization == "int8" and all(s.shape[a] == 1 for a in contracted):
            # Already one scale per output channel (or coarser): the int8 values stay exact.
            per_channel = spread_scales(
                s.astype(np.float32), tuple(1 if a in contracted else n for a, n in enumerate(w.shape))
            )
            scale_shape = tuple(1 if a in leaf.target_contracted else n for a, n in enumerate(leaf.target))
            _write(writer, config, leaf, sl, Quantized(w.reshape(target), per_channel.reshape(scale_shape[len(sl) :])))
            continue
        dense = dequantize_blocks(w, s).reshape(target)
        _write(writer, config, leaf, sl, dense if quantized else dense.astype(dtype))


def _write_float(writer: CheckpointWriter, config, leaf: Leaf, obj: np.ndarray, dtype) -> None:
    """A plain float leaf; a matmul weight the config stores quantized is quantized by the writer."""
    if writer.stores_quantized(leaf.dest):
        for sl in _slices(leaf):
            _write(writer, config, leaf, sl, obj[sl].astype(np.float32).reshape(leaf.target[len(sl) :]))
        return
    out = obj.reshape(leaf.target).astype(np.dtype(dtype) if dtype is not None else obj.dtype, copy=False)
    _write(writer, config, leaf, (), out)


# -- conversion -----------------------------------------------------------------------------------
def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype=None,
    overwrite: bool = False,
    config: str | Mapping | ml_collections.ConfigDict = "grok-1",
    quantize: str | None = None,
) -> None:
    """Convert the Grok-1 release at `src` (the directory holding ckpt-0/, or ckpt-0 itself).

    WARNING: the release's files are pickles and unpickling can run code - convert only trusted
    checkpoints (see the module docstring for what this reader allows).

    dtype: storage dtype of floating weights; int8 weights are dequantized to it (default bfloat16,
      the release's compute dtype), plain float leaves keep their own dtype unless it is given.
    config: a preset name (default "grok-1"), a config, or a dict of overrides in the release's
      field names (see RELEASE_FIELDS), optionally with "preset" naming the base.
    quantize: "int8" keeps QuantizedWeight8bit matmul weights as int8 + per-output-channel scales,
      "fp8" quantizes them in fp8 blocks (the config says which: the model runs weight-only
      quantized matmuls); embeddings, norms and the router are always float.
    """
    src, dst = Path(src), Path(dst)
    c = resolve_config(config)
    # The release's tokenizer.model, whatever a small preset used; the model built quantized or not.
    fmt = "none" if quantize is None else check_format(quantize)
    c = _validated(lambda: replace(c, tokenizer="sentencepiece", quantization=fmt))
    plan = leaf_plan(c)
    ckpt, files = leaf_files(src, len(plan))
    dequant_dtype = np.dtype(dtype) if dtype is not None else np.dtype(ml_dtypes.bfloat16)
    logger.warning(PICKLE_WARNING)
    with CheckpointWriter(dst, c, overwrite=overwrite) as writer:
        for leaf, path in zip(plan, files):
            obj = read_leaf(path)
            if isinstance(obj, QuantizedWeight8bit):
                _write_quantized(writer, c, leaf, obj, dequant_dtype)
            else:
                if obj.shape != leaf.shape:
                    raise CheckpointFormatError(
                        f"leaf {leaf.index} ({leaf.name}, {path.name}): shape {obj.shape} does not match the config "
                        f"({leaf.shape}); check the config's {_fields_of(leaf)}"
                    )
                _write_float(writer, c, leaf, obj, dtype)
            logger.info("converted leaf %d/%d %s", leaf.index + 1, len(plan), leaf.name)
            del obj
        tokenizer = _tokenizer_file(src, ckpt)
        if tokenizer is not None:
            writer.copy_file(tokenizer, "tokenizer.model")
