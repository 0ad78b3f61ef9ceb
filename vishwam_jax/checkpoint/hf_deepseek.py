"""DeepSeek-V3 checkpoints in HuggingFace layout -> model directory.

Two forms are found in the wild, with the same tensor names:
  * bf16/f32 safetensors (transformers `save_pretrained`, community re-uploads);
  * the official release (deepseek-ai/DeepSeek-V3): every projection weight float8 e4m3 with a float32
    `<name>.weight_scale_inv` beside it holding one scale per 128 x 128 block (edge blocks partial):
    w[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128].
The multi-token-prediction module is stored as one more decoder layer, index num_hidden_layers, with
extra tensors (enorm, hnorm, eh_proj, shared_head.norm; its embed_tokens and shared_head.head are
copies of the main model's, which our MTP shares). transformers' own DeepseekV3ForCausalLM saves no
MTP layer; then the converted model has num_mtp_layers = 0.

Written in the model's own layout (models/deepseek_v3.py): the dense layers, the MoE layers and the
MTP depths each form a stack whose leaves have the layer on a leading axis (presets/deepseek_v3.py
`layer_slot` says which stack and index a layer goes to). Routed experts go into [L, E, ...] leaves
one (layer, expert) slice at a time, so peak memory is about one expert (plus one zarr chunk), never
one layer. PyTorch weights are [out, in]; ours [in, out] with heads as their own axis (models/mla.py
lists the layout).

quantize="fp8" on the release keeps its float8 values and block scales bit for bit: our kernels are
the release's matrices transposed, with the heads' dimensions split out of the flattened rows or
columns, so each kernel's matrix view (vishwam_jax/quantization) is the release's matrix transposed
and its block grid is `weight_scale_inv` transposed. The one exception is kv_b_proj, which we split
into W_k_b and W_v_b per head: its blocks split with it when qk_nope_head_dim and v_head_dim are
multiples of the block's columns (the release: 128, 128, 128), and otherwise those two are
requantized from their exact dequantized values (logged). Any other quantize dequantizes first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_dtypes
import numpy as np

from vishwam_jax.checkpoint.hf_common import (
    copy_tokenizer_files,
    first_id,
    has_safetensors,
    read_hf_config,
    rope_settings,
    storage_dtype,
)
from vishwam_jax.checkpoint.orbax_io import CheckpointWriter, Quantized
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError, SafetensorsIndex
from vishwam_jax.presets import ConfigError, from_dict
from vishwam_jax.presets.deepseek_v3 import deepseek_v3_base, layer_slot, mtp_slot
from vishwam_jax.quantization import check_format

log = logging.getLogger(__name__)

_MODEL_TYPES = ("deepseek_v3",)
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def detect(src: Path) -> bool:
    if not (Path(src) / "config.json").exists() or not has_safetensors(src):
        return False
    return read_hf_config(src).get("model_type") in _MODEL_TYPES


# -- config ----------------------------------------------------------------------------------------
def config_from_hf(hf: dict, where: str = "config.json"):
    """Our (frozen, validated) config from a DeepSeek-V3 config.json, as the release writes it
    (`rope_scaling` with "type") or as transformers v5 writes it (`rope_parameters` with "rope_type")."""
    return _freeze(_config_fields(hf, where), where)


def _freeze(fields, where: str):
    try:
        return from_dict(fields.to_dict())
    except ConfigError as err:
        raise CheckpointFormatError(f"{where}: {err}") from None


def _config_fields(hf: dict, where: str):
    """The config's fields (a mutable ConfigDict, before validation and freezing)."""

    def unsupported(what):
        return CheckpointFormatError(f"{where}: {what} is not DeepSeek-V3 (not supported)")

    def need(key, table=hf, where_in=""):
        if table.get(key) is None:
            raise CheckpointFormatError(f"{where}: required field {where_in}{key!r} is missing")
        return table[key]

    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise unsupported(f"scoring_func {hf['scoring_func']!r}")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise unsupported(f"topk_method {hf['topk_method']!r}")
    if hf.get("moe_layer_freq", 1) != 1:
        raise unsupported(f"moe_layer_freq {hf['moe_layer_freq']}")
    if hf.get("attention_bias"):
        raise unsupported("attention_bias=true")
    if hf.get("tie_word_embeddings"):
        raise unsupported("tie_word_embeddings=true")
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act {hf['hidden_act']!r}")

    c = deepseek_v3_base()
    c.name = hf.get("_name_or_path", "") or "hf-deepseek_v3"
    c.vocab_size = need("vocab_size")
    c.d_model = need("hidden_size")
    c.num_layers = need("num_hidden_layers")
    c.num_dense_layers = int(hf.get("first_k_dense_replace") or 0)
    c.ffn_dim = need("intermediate_size")
    c.num_heads = need("num_attention_heads")
    c.q_lora_rank = int(hf.get("q_lora_rank") or 0)
    c.kv_lora_rank = need("kv_lora_rank")
    c.qk_nope_head_dim = need("qk_nope_head_dim")
    c.qk_rope_head_dim = need("qk_rope_head_dim")
    c.v_head_dim = need("v_head_dim")
    c.num_experts = need("n_routed_experts")
    c.num_shared_experts = int(hf.get("n_shared_experts") or 0)
    c.moe_ffn_dim = need("moe_intermediate_size")
    c.num_experts_per_token = need("num_experts_per_tok")
    c.num_expert_groups = int(hf.get("n_group") or 1)
    c.num_groups_per_token = int(hf.get("topk_group") or 1)
    c.routed_scaling_factor = float(hf.get("routed_scaling_factor", 1.0))
    c.norm_topk_prob = bool(hf.get("norm_topk_prob", True))
    c.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    c.max_seq_len = int(hf.get("max_position_embeddings", 4096))
    if not c.num_shared_experts:
        raise unsupported("a model without shared experts")
    if c.num_experts % c.num_expert_groups:
        raise CheckpointFormatError(f"{where}: {c.num_experts} experts do not split into {c.num_expert_groups} groups")
    group = c.num_experts // c.num_expert_groups
    if c.num_experts_per_token > c.num_groups_per_token * group:
        raise CheckpointFormatError(
            f"{where}: {c.num_experts_per_token} experts per token cannot come from {c.num_groups_per_token} "
            f"groups of {group}"
        )

    rope = rope_settings(hf)
    c.rope_theta = float(rope.get("rope_theta") or 10_000.0)
    kind = rope.get("rope_type") or "default"
    if kind == "yarn":
        if rope.get("attention_factor") is not None or rope.get("truncate") is False:
            raise unsupported("a YaRN attention_factor override or truncate=false")
        c.rope_scaling_type = "yarn"
        c.rope_original_max_len = int(need("original_max_position_embeddings", rope, "rope_scaling."))
        factor = rope.get("factor")
        c.rope_scaling_factor = float(factor if factor is not None else c.max_seq_len / c.rope_original_max_len)
        c.rope_beta_fast = float(rope.get("beta_fast") or 32)
        c.rope_beta_slow = float(rope.get("beta_slow") or 1)
        # Absent mscales are 0 (transformers' reading): no softmax correction, cos/sin * mscale(f).
        c.rope_mscale = float(rope.get("mscale") or 0.0)
        c.rope_mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
    elif kind == "default":
        c.rope_scaling_type, c.rope_scaling_factor = "none", 1.0
    else:
        raise unsupported(f"rope_type {kind!r}")
    # Absent in the release's config.json: its weights rotate interleaved pairs (transformers'
    # default, rope_interleave=True).
    c.rope_interleaved = bool(hf.get("rope_interleave", True))
    c.num_mtp_layers = int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)
    c.eos_token_id = first_id(hf.get("eos_token_id"), 1)
    c.bos_token_id = first_id(hf.get("bos_token_id"), 0)
    c.pad_token_id = first_id(hf.get("pad_token_id"), c.eos_token_id)
    c.tokenizer = "hf"
    return c


def _is_fp8(source: SafetensorsIndex) -> bool:
    return any(name.endswith("weight_scale_inv") for name in source.names())


def _block_size(hf: dict) -> tuple[int, int]:
    q = hf.get("quantization_config") or {}
    if q and q.get("quant_method") not in (None, "fp8"):
        raise CheckpointFormatError(f"config.json: quantization {q.get('quant_method')!r} is not supported (only fp8)")
    block = q.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


# -- tensors ---------------------------------------------------------------------------------------
def _check_grid(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> None:
    if w.ndim != 2 or scale_inv.ndim != 2:
        raise CheckpointFormatError(
            f"{name}: block-quantized weights must be 2-D (got {w.shape}, scales {scale_inv.shape})"
        )
    rows, cols = w.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointFormatError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a {w.shape} weight "
            f"in {block[0]}x{block[1]} blocks"
        )


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str = "tensor") -> np.ndarray:
    """float32 w[i, j] * scale_inv[i // b0, j // b1]; the last block of each axis may be partial."""
    _check_grid(w, scale_inv, block, name)
    rows, cols = w.shape
    scales = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], axis=0), block[1], axis=1)
    return np.asarray(w, np.float32) * scales[:rows, :cols]


class _Tensors:
    """Tensors by name, float8 ones dequantized (or kept); `dtype` of each is the one it is stored in."""

    def __init__(self, index: SafetensorsIndex, block: tuple[int, int], dtype):
        self.index, self.block, self.dtype = index, block, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, *, keep_fp8: bool = False
    ) -> tuple[np.ndarray | Quantized, np.dtype]:
        """(array, storage dtype); `shape` is checked against the source tensor (PyTorch layout).
        keep_fp8: a block-quantized tensor comes back as it is stored, Quantized(float8 [out, in],
        scale_inv [out blocks, in blocks])."""
        if name not in self.index:
            raise CheckpointFormatError(f"{self.index.directory}: tensor {name!r} is missing")
        w = self.index.get(name)
        if shape is not None and tuple(w.shape) != tuple(shape):
            raise CheckpointFormatError(f"{name}: shape {tuple(w.shape)} does not match the config ({tuple(shape)})")
        out_dtype = storage_dtype(w, self.dtype)
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if scale_name in self.index:
            scale_inv = self.index.get(scale_name)
            if keep_fp8 and w.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
                _check_grid(w, scale_inv, self.block, name)
                return Quantized(np.asarray(w), np.asarray(scale_inv, np.float32)), out_dtype
            return dequantize_fp8(w, scale_inv, self.block, name), out_dtype
        if w.dtype in _FP8:
            raise CheckpointFormatError(f"{name} is float8 but {scale_name} is missing")
        return w, out_dtype


def _transposed(q: Quantized, transform) -> Quantized:
    """A kept FP8 [out, in] tensor in our layout: the values transformed as a float weight would be
    (transposed, heads split out of a flattened side), the block grid transposed."""
    return Quantized(transform(q.values), np.ascontiguousarray(q.scale.T))


def _split_kv_b(q: Quantized, transform, h: int, nope: int, vd: int, block_cols: int, part: str) -> Quantized | None:
    """W_k_b (part "k") or W_v_b ("v") of a kept FP8 kv_b_proj, whose rows are per head [nope ; v]:
    the block grid split the same way, or None when a block straddles the split."""
    if nope % block_cols or vd % block_cols:
        return None
    scale = q.scale.T.reshape(q.scale.shape[1], h, (nope + vd) // block_cols)
    cut = nope // block_cols
    scale = scale[..., :cut] if part == "k" else scale[..., cut:]
    return Quantized(transform(q.values), np.ascontiguousarray(scale.reshape(scale.shape[0], -1)))


def convert(src: Path, dst: Path, *, dtype=None, overwrite: bool = False, quantize: str | None = None) -> None:
    src = Path(src)
    hf = read_hf_config(src)
    where = str(src / "config.json")
    fields = _config_fields(hf, where)
    source = SafetensorsIndex(src)
    block = _block_size(hf)
    tensors = _Tensors(source, block, dtype)
    if quantize is not None:
        fields.quantization = check_format(quantize)
        # The release's [out, in] blocks are [in, out] blocks of our kernels' matrices.
        fields.quantization_block = (block[1], block[0]) if quantize == "fp8" and _is_fp8(source) else (128, 128)
    keep_fp8 = quantize == "fp8"
    mtp_first = fields.num_layers
    if fields.num_mtp_layers and f"model.layers.{mtp_first}.eh_proj.weight" not in source:
        log.info(
            "%s: config has %d MTP layers but no model.layers.%d.* tensors; converting without MTP",
            src,
            fields.num_mtp_layers,
            mtp_first,
        )
        fields.num_mtp_layers = 0
    config = _freeze(fields, where)

    d, h, v = config.d_model, config.num_heads, config.vocab_size
    nope, rope, r, vd = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank, config.v_head_dim
    e, fe = config.num_experts, config.moe_ffn_dim

    with CheckpointWriter(dst, config, overwrite=overwrite) as writer:

        def our_layout(path, name, shape, transform, force_dtype=None, kept=_transposed):
            """A tensor in our layout: a float array, or Quantized as the release stores it when
            `path` is a kernel we keep in FP8 (`kept` maps its grid; None from it: dequantize instead)."""
            keep = keep_fp8 and writer.stores_quantized(path)
            w, out_dtype = tensors.get(name, shape, keep_fp8=keep)
            if isinstance(w, Quantized):
                q = kept(w, lambda a: np.ascontiguousarray(transform(a)))
                if q is not None:
                    return q
                log.info("%s: fp8 blocks straddle the per-head split; requantizing it from its exact values", name)
                w, out_dtype = tensors.get(name, shape)
            return np.ascontiguousarray(transform(w)).astype(force_dtype or out_dtype)

        def put(path, name, shape, transform=lambda w: w, force_dtype=None, *, index=None, count=0, kept=_transposed):
            """One tensor, transformed to our layout, at `index` of the stacked leaf `path` (or unstacked)."""
            writer.write_layer(path, index, count, our_layout(path, name, shape, transform, force_dtype, kept))

        def put_experts(path, L, proj, shape, transform, index, count):
            """model.layers.N.mlp.experts.{0..E-1}.<proj>.weight into slices [index, 0..E-1] of the
            [count, E, ...] leaf `path`: one expert in memory at a time."""
            fused = f"{L}mlp.experts.gate_up_proj" if proj in ("gate_proj", "up_proj") else f"{L}mlp.experts.down_proj"
            for i in range(e):
                if fused in source:  # transformers' in-memory layout: gate_up [E, 2f, d], down [E, d, f]
                    w, out_dtype = source.get(fused)[i], storage_dtype(source.get(fused), dtype)
                    w = {"gate_proj": w[:fe], "up_proj": w[fe:], "down_proj": w}[proj]
                    if tuple(w.shape) != shape:
                        raise CheckpointFormatError(
                            f"{fused}: expert shape {tuple(w.shape)} does not match the config ({shape})"
                        )
                    out = np.ascontiguousarray(transform(w)).astype(out_dtype)
                else:
                    out = our_layout(path, f"{L}mlp.experts.{i}.{proj}.weight", shape, transform)
                writer.write_slice(path, (count, e), (index, i), out)

        def put_layer(prefix: tuple, L: str, moe: bool, index: int, count: int):
            def p(path, name, shape, transform=lambda w: w, force_dtype=None):
                put(prefix + path, L + name, shape, transform, force_dtype, index=index, count=count)

            a = ("attn",)
            p(("attn_norm", "scale"), "input_layernorm.weight", (d,))
            if config.q_lora_rank:
                q = config.q_lora_rank
                p(a + ("wq_a", "kernel"), "self_attn.q_a_proj.weight", (q, d), lambda w: w.T)
                p(a + ("q_norm", "scale"), "self_attn.q_a_layernorm.weight", (q,))
                p(
                    a + ("wq_b", "kernel"),
                    "self_attn.q_b_proj.weight",
                    (h * (nope + rope), q),
                    lambda w: w.T.reshape(q, h, nope + rope),
                )
            else:
                p(
                    a + ("wq", "kernel"),
                    "self_attn.q_proj.weight",
                    (h * (nope + rope), d),
                    lambda w: w.T.reshape(d, h, nope + rope),
                )
            p(a + ("wkv_a", "kernel"), "self_attn.kv_a_proj_with_mqa.weight", (r + rope, d), lambda w: w.T)
            p(a + ("kv_norm", "scale"), "self_attn.kv_a_layernorm.weight", (r,))
            # kv_b_proj rows are per head [k_nope (nope) ; v (v_head_dim)]; split for absorption.
            kv_b = lambda w: w.T.reshape(r, h, nope + vd)  # noqa: E731
            cols = config.quantization_block[1]
            for part, sl in (("k", np.s_[..., :nope]), ("v", np.s_[..., nope:])):
                put(
                    prefix + a + (f"w{part}_b", "kernel"),
                    L + "self_attn.kv_b_proj.weight",
                    (h * (nope + vd), r),
                    lambda w, sl=sl: kv_b(w)[sl],
                    index=index,
                    count=count,
                    kept=lambda q, t, part=part: _split_kv_b(q, t, h, nope, vd, cols, part),
                )
            p(a + ("wo", "kernel"), "self_attn.o_proj.weight", (d, h * vd), lambda w: w.T.reshape(h, vd, d))
            p(("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,))
            if not moe:
                f = config.ffn_dim
                p(("mlp", "gate", "kernel"), "mlp.gate_proj.weight", (f, d), lambda w: w.T)
                p(("mlp", "up", "kernel"), "mlp.up_proj.weight", (f, d), lambda w: w.T)
                p(("mlp", "down", "kernel"), "mlp.down_proj.weight", (d, f), lambda w: w.T)
                return
            # Routing stays float32 whatever `dtype`: near-ties between experts decide the route.
            p(("router", "kernel"), "mlp.gate.weight", (e, d), lambda w: w.T, np.float32)
            p(("router", "bias"), "mlp.gate.e_score_correction_bias", (e,), force_dtype=np.float32)
            for proj, name, shape in (
                ("gate", "gate_proj", (fe, d)),
                ("up", "up_proj", (fe, d)),
                ("down", "down_proj", (d, fe)),
            ):
                put_experts(prefix + ("experts", proj, "kernel"), L, name, shape, lambda w: w.T, index, count)
            fs = fe * config.num_shared_experts
            p(("shared", "gate", "kernel"), "mlp.shared_experts.gate_proj.weight", (fs, d), lambda w: w.T)
            p(("shared", "up", "kernel"), "mlp.shared_experts.up_proj.weight", (fs, d), lambda w: w.T)
            p(("shared", "down", "kernel"), "mlp.shared_experts.down_proj.weight", (d, fs), lambda w: w.T)

        put(("embed", "embedding"), "model.embed_tokens.weight", (v, d))
        put(("final_norm", "scale"), "model.norm.weight", (d,))
        put(("lm_head", "kernel"), "lm_head.weight", (v, d), lambda w: w.T)
        for i in range(config.num_layers):
            prefix, at, count = layer_slot(config, i)
            put_layer(prefix, f"model.layers.{i}.", i >= config.num_dense_layers, at, count)
        for k in range(config.num_mtp_layers):
            prefix, at, count = mtp_slot(config, k)
            L = f"model.layers.{mtp_first + k}."
            put(prefix + ("enorm", "scale"), L + "enorm.weight", (d,), index=at, count=count)
            put(prefix + ("hnorm", "scale"), L + "hnorm.weight", (d,), index=at, count=count)
            put(prefix + ("eh_proj", "kernel"), L + "eh_proj.weight", (d, 2 * d), lambda w: w.T, index=at, count=count)
            put(prefix + ("norm", "scale"), L + "shared_head.norm.weight", (d,), index=at, count=count)
            put_layer(prefix + ("block",), L, True, at, count)
        copy_tokenizer_files(src, writer)
