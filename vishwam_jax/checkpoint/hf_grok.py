"""HuggingFace-format ports of Grok-1 (safetensors) -> model directory.

There is no transformers implementation of Grok-1; two community layouts of the release's weights are
published, and both are supported here (PyTorch layout: linear weights [out, in], one tensor per
expert):

1. hpcai-tech/grok-1 layout (config `architectures: ["Grok1ModelForCausalLM"]`, as vLLM and SGLang
   load it):
       model.embed_tokens.weight                       model.norm.weight      [lm_head.weight]
       model.layers.{i}.pre_attn_norm | post_attn_norm | pre_moe_norm | post_moe_norm .weight (or .scale)
       model.layers.{i}.attn.q_proj | k_proj | v_proj | o_proj .weight
       model.layers.{i}.moe_block.gate.weight                                   router [experts, d]
       model.layers.{i}.moe_block.experts.{e}.linear | linear_v | linear_1 .weight   W, V, U
2. keyfan/grok-1-hf layout (also Aqwu/grok-1-hf; `architectures: ["GrokForCausalLM"]`, model_type
   "grok"), the release's module names with dots:
       transformer.in_out_embed.weight                 transformer.rms_norm.weight   [lm_head.weight]
       transformer.decoder_layer.{i}.rms_norm | rms_norm_1 | rms_norm_2 | rms_norm_3 .weight
       transformer.decoder_layer.{i}.multi_head_attention.query | key | value | linear .weight
       transformer.decoder_layer.{i}.router.weight
       transformer.decoder_layer.{i}.moe.{e}.linear | linear_v | linear_1 .weight

Both ports were published as PyTorch `.bin` shards (`pytorch_model-000NN-of-000MM.bin`); those are
read with `torch.load(weights_only=True, mmap=True)` (torch's restricted unpickler: tensors only, and
memory-mapped, so one tensor at a time is read), as are `*.safetensors` re-saves of them.
Not supported: Grok-2 (`Grok1ForCausalLM`, a different architecture); the `pytorch/` port proposed in
xai-org/grok-1, which has no published weights.

Dimensions, the three multipliers and the token ids are read from config.json (the release's values
where a field is absent). The computation itself is the release's: these ports carry its weights, so
the activation (tanh GELU), the attention cap (30, or config `max_attn_value`), RMSNorm eps 1e-5 and
RoPE theta 10000 are not taken from config.json, whose values in some ports are Mixtral defaults the
weights were never run with (Aqwu's GrokConfig says silu and theta 1e5); a disagreeing value is logged.
An `lm_head.weight`, if present, must equal the embedding: Grok-1's output is tied.

Written layout: models/grok1.py's module paths, every layer at its index of the stacked `layers`
leaves (presets.grok1.layer_slot); one layer's expert stack [e, d, f] is assembled one expert at a
time and written whole, so memory holds at most one layer's stack.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np

from vishwam_jax.checkpoint.hf_common import (
    copy_tokenizer_files,
    first_id,
    has_safetensors,
    read_hf_config,
    storage_dtype,
)
from vishwam_jax.checkpoint.orbax_io import CheckpointWriter
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError, SafetensorsIndex
from vishwam_jax.presets import Config, ConfigError, from_dict, replace
from vishwam_jax.presets.grok1 import grok1_base, layer_slot
from vishwam_jax.quantization import check_format

BIN_INDEX = "pytorch_model.bin.index.json"

logger = logging.getLogger(__name__)

_ARCHITECTURES = {"Grok1ModelForCausalLM", "GrokForCausalLM"}
_MODEL_TYPES = {"grok-1", "grok"}

# Our parameter name -> tensor name, per layout ({i}: layer, {e}: expert).
LAYOUTS = {
    "hpcai": {
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "attn_norm": "model.layers.{i}.pre_attn_norm.weight",
        "post_attn_norm": "model.layers.{i}.post_attn_norm.weight",
        "moe_norm": "model.layers.{i}.pre_moe_norm.weight",
        "post_moe_norm": "model.layers.{i}.post_moe_norm.weight",
        "q": "model.layers.{i}.attn.q_proj.weight",
        "k": "model.layers.{i}.attn.k_proj.weight",
        "v": "model.layers.{i}.attn.v_proj.weight",
        "o": "model.layers.{i}.attn.o_proj.weight",
        "router": "model.layers.{i}.moe_block.gate.weight",
        "gate": "model.layers.{i}.moe_block.experts.{e}.linear.weight",
        "up": "model.layers.{i}.moe_block.experts.{e}.linear_v.weight",
        "down": "model.layers.{i}.moe_block.experts.{e}.linear_1.weight",
    },
    "keyfan": {
        "embed": "transformer.in_out_embed.weight",
        "final_norm": "transformer.rms_norm.weight",
        "attn_norm": "transformer.decoder_layer.{i}.rms_norm.weight",
        "post_attn_norm": "transformer.decoder_layer.{i}.rms_norm_1.weight",
        "moe_norm": "transformer.decoder_layer.{i}.rms_norm_2.weight",
        "post_moe_norm": "transformer.decoder_layer.{i}.rms_norm_3.weight",
        "q": "transformer.decoder_layer.{i}.multi_head_attention.query.weight",
        "k": "transformer.decoder_layer.{i}.multi_head_attention.key.weight",
        "v": "transformer.decoder_layer.{i}.multi_head_attention.value.weight",
        "o": "transformer.decoder_layer.{i}.multi_head_attention.linear.weight",
        "router": "transformer.decoder_layer.{i}.router.weight",
        "gate": "transformer.decoder_layer.{i}.moe.{e}.linear.weight",
        "up": "transformer.decoder_layer.{i}.moe.{e}.linear_v.weight",
        "down": "transformer.decoder_layer.{i}.moe.{e}.linear_1.weight",
    },
}


class TorchBinIndex:
    """The tensors of PyTorch `.bin` shards, with SafetensorsIndex's interface (names, get).

    Each shard is opened with `weights_only=True` (torch's restricted unpickler, which rebuilds
    tensors and refuses arbitrary objects) and `mmap=True`, so a tensor's bytes are read only when
    it is converted."""

    def __init__(self, directory: str | Path):
        try:
            import torch  # noqa: F401  (optional: only these ports need it)
        except ImportError:
            raise CheckpointFormatError(
                f"{directory} holds PyTorch .bin shards; reading them needs torch (pip install torch), "
                "or re-save them as safetensors"
            ) from None
        self.directory = Path(directory)
        self._shards: dict[Path, dict] = {}
        index = self.directory / BIN_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointFormatError(f"{index} is not a valid shard index ({err})") from None
            self._file_of = {name: self.directory / file for name, file in weight_map.items()}
            missing = sorted({f.name for f in self._file_of.values() if not f.is_file()})
            if missing:
                raise CheckpointFormatError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
        else:
            self._file_of = {name: f for f in sorted(self.directory.glob("*.bin")) for name in self._shard(f)}
        if not self._file_of:
            raise CheckpointFormatError(f"no PyTorch .bin shards in {self.directory}")

    def _shard(self, file: Path) -> dict:
        if file not in self._shards:
            import torch

            try:
                self._shards[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for bad files
                raise CheckpointFormatError(
                    f"{file}: not a PyTorch weights file ({type(err).__name__}: {err})"
                ) from None
            if not isinstance(self._shards[file], dict):
                raise CheckpointFormatError(f"{file} holds a {type(self._shards[file]).__name__}, not a state dict")
        return self._shards[file]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray:
        import torch

        if name not in self._file_of:
            raise CheckpointFormatError(f"tensor {name!r} not found in {self.directory}")
        t = self._shard(self._file_of[name]).get(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointFormatError(f"{self._file_of[name].name}: {name!r} is missing or not a tensor")
        t = t.contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def _has_bin(src: Path) -> bool:
    return (src / BIN_INDEX).exists() or any(src.glob("*.bin"))


def detect(src: str | Path) -> bool:
    src = Path(src)
    if not (src / "config.json").exists() or not (has_safetensors(src) or _has_bin(src)):
        return False
    hf = read_hf_config(src)
    return bool(set(hf.get("architectures") or ()) & _ARCHITECTURES) or hf.get("model_type") in _MODEL_TYPES


def _layout(index: SafetensorsIndex | TorchBinIndex) -> str:
    for name, layout in LAYOUTS.items():
        if layout["embed"] in index:
            return name
    raise CheckpointFormatError(
        f"{index.directory}: no Grok-1 embedding tensor ({' or '.join(l['embed'] for l in LAYOUTS.values())}); "
        "supported layouts are those of hpcai-tech/grok-1 and keyfan/grok-1-hf"
    )


def config_from_hf(hf: dict) -> Config:
    c = grok1_base()
    c.name = hf.get("_name_or_path", "") or "hf-grok-1"
    c.vocab_size = int(hf.get("vocab_size", c.vocab_size))
    c.d_model = int(hf.get("hidden_size", c.d_model))
    c.num_layers = int(hf.get("num_hidden_layers", c.num_layers))
    c.num_heads = int(hf.get("num_attention_heads", c.num_heads))
    c.num_kv_heads = int(hf.get("num_key_value_heads") or c.num_heads)
    c.head_dim = int(hf.get("head_dim") or c.d_model // c.num_heads)
    c.moe_ffn_dim = int(hf.get("intermediate_size", c.moe_ffn_dim))
    c.widening_factor = c.moe_ffn_dim * 3 / (2 * c.d_model)  # informational: moe_ffn_dim is what the model reads
    c.num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or c.num_experts)
    c.num_experts_per_token = int(hf.get("num_experts_per_tok", c.num_experts_per_token))
    for field in ("embedding_multiplier_scale", "output_multiplier_scale", "attn_output_multiplier"):
        value = hf.get(field)
        if isinstance(value, (list, tuple)):  # one published config wrote `x = value,` (a 1-tuple)
            value = value[0]
        if value is not None:
            c[field] = float(value)
    if hf.get("max_attn_value") is not None:
        c.attn_logit_softcap = float(hf["max_attn_value"])
    c.max_seq_len = int(hf.get("max_position_embeddings") or c.max_seq_len)
    c.pad_token_id = first_id(hf.get("pad_token_id"), 0)
    c.eos_token_id = first_id(hf.get("eos_token_id"), 2)
    c.bos_token_id = first_id(hf.get("bos_token_id"), 1)
    for field, ours in (("rope_theta", c.rope_theta), ("rms_norm_eps", c.norm_eps)):
        if hf.get(field) is not None and float(hf[field]) != ours:
            logger.warning(
                "config.json says %s=%s; using the release's %s (the weights were trained with it)",
                field,
                hf[field],
                ours,
            )
    if hf.get("hidden_act") not in (None, "gelu", "gelu_new", "gelu_pytorch_tanh"):
        logger.warning("config.json says hidden_act=%s; using the release's tanh GELU", hf["hidden_act"])
    try:
        return from_dict(c.to_dict())  # validated and frozen
    except ConfigError as err:
        raise CheckpointFormatError(f"config.json: {err}") from None


def _check_tied(index: SafetensorsIndex | TorchBinIndex, embed_name: str, rows: int = 4096) -> None:
    if "lm_head.weight" not in index:
        return
    embed, head = index.get(embed_name), index.get("lm_head.weight")
    if head.shape != embed.shape:
        raise CheckpointFormatError(f"lm_head.weight {head.shape} differs in shape from {embed_name} {embed.shape}")
    for start in range(0, embed.shape[0], rows):  # chunked: the release's table is 1.6 GB
        if not np.array_equal(embed[start : start + rows], head[start : start + rows]):
            raise CheckpointFormatError(
                f"lm_head.weight differs from {embed_name} (rows {start}-{start + rows}): Grok-1 ties its output "
                "to the input embedding, so this is not a Grok-1 checkpoint"
            )


def convert(
    src: Path, dst: Path, *, dtype=None, overwrite: bool = False, quantize: str | None = None, **options
) -> None:
    if options:
        # config= belongs to the release's format: these ports ship config.json and dense weights.
        raise CheckpointFormatError(f"option(s) {', '.join(sorted(options))} do not apply to HF-format Grok-1 ports")
    src, dst = Path(src), Path(dst)
    config = config_from_hf(read_hf_config(src))
    if quantize is not None:  # the writer quantizes every kernel the model stores quantized
        config = replace(config, quantization=check_format(quantize))
    index = SafetensorsIndex(src) if has_safetensors(src) else TorchBinIndex(src)
    names = LAYOUTS[_layout(index)]
    d, h, kh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    e, f, count = config.num_experts, config.moe_ffn_dim, config.num_layers
    _check_tied(index, names["embed"])

    def get(key: str, shape: tuple[int, ...], **fmt) -> np.ndarray:
        name = names[key].format(**fmt)
        if name not in index and name.endswith(".weight") and key.endswith("norm"):
            name = name[: -len("weight")] + "scale"  # some ports keep Haiku's name for norm weights
        w = index.get(name)
        if tuple(w.shape) != shape:
            raise CheckpointFormatError(f"{name}: shape {tuple(w.shape)} does not match config.json ({shape})")
        return w

    with CheckpointWriter(dst, config, overwrite=overwrite) as writer:

        def put(path: tuple, w: np.ndarray, index: int | None = None) -> None:
            writer.write_layer(path, index, count, np.ascontiguousarray(w).astype(storage_dtype(w, dtype), copy=False))

        put(("embed", "embedding"), get("embed", (config.vocab_size, d)))
        put(("final_norm", "scale"), get("final_norm", (d,)))
        for i in range(config.num_layers):
            L, n = layer_slot(config, i)
            for key in ("attn_norm", "post_attn_norm", "moe_norm", "post_moe_norm"):
                put(L + (key, "scale"), get(key, (d,), i=i), n)
            put(L + ("attn", "q", "kernel"), get("q", (h * hd, d), i=i).T.reshape(d, h, hd), n)
            put(L + ("attn", "k", "kernel"), get("k", (kh * hd, d), i=i).T.reshape(d, kh, hd), n)
            put(L + ("attn", "v", "kernel"), get("v", (kh * hd, d), i=i).T.reshape(d, kh, hd), n)
            put(L + ("attn", "o", "kernel"), get("o", (d, h * hd), i=i).T.reshape(h, hd, d), n)
            put(L + ("router", "kernel"), get("router", (e, d), i=i).T, n)
            for key, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                first = get(key, shape, i=i, e=0)
                stack = np.empty((e,) + shape[::-1], storage_dtype(first, dtype))
                for j in range(e):  # one expert at a time (PyTorch [out, in] -> ours [in, out])
                    stack[j] = get(key, shape, i=i, e=j).T
                writer.write_layer(L + ("experts", key, "kernel"), n, count, stack)
        copy_tokenizer_files(src, writer)
