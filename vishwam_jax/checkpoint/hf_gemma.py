"""HuggingFace Gemma / Gemma 2 / Gemma 3 (text) checkpoints -> model directory.

PyTorch stores linear weights [out, in]; ours are [in, out] with heads as their own axis
(q [d, h, hd], o [h, hd, d]) so that sharding rules can name the head axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vishwam_jax.checkpoint.hf_common import (
    copy_tokenizer_files,
    first_id,
    has_safetensors,
    read_hf_config,
    rope_settings,
    storage_dtype,
)
from vishwam_jax.checkpoint.orbax_io import CheckpointWriter
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError, SafetensorsIndex
from vishwam_jax.presets import ConfigError, from_dict, replace
from vishwam_jax.presets.gemma import attention_period, gemma_base, layer_slot
from vishwam_jax.quantization import check_format

_MODEL_TYPES = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}
# Where the decoder's tensors live, by architecture: text-only or inside a multimodal checkpoint.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def detect(src: Path) -> bool:
    if not (Path(src) / "config.json").exists() or not has_safetensors(src):
        return False
    return read_hf_config(src).get("model_type") in _MODEL_TYPES


def config_from_hf(hf: dict):
    generation = _MODEL_TYPES[hf["model_type"]]
    if hf["model_type"] == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    c = gemma_base()
    c.name = hf.get("_name_or_path", "") or f"hf-{hf['model_type']}"
    c.vocab_size = hf["vocab_size"]
    c.d_model = hf["hidden_size"]
    c.num_layers = hf["num_hidden_layers"]
    c.num_heads = hf["num_attention_heads"]
    c.num_kv_heads = hf.get("num_key_value_heads", c.num_heads)
    c.head_dim = hf.get("head_dim") or c.d_model // c.num_heads
    c.ffn_dim = hf["intermediate_size"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    # Gemma's released configs say "gelu" but mean the tanh approximation (as transformers does).
    c.activation = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)
    c.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    c.query_pre_attn_scalar = float(hf.get("query_pre_attn_scalar") or c.head_dim)
    c.attn_logit_softcap = float(hf.get("attn_logit_softcapping") or 0.0)
    c.final_logit_softcap = float(hf.get("final_logit_softcapping") or 0.0)
    c.use_post_attn_norm = c.use_post_ffw_norm = generation >= 2
    c.use_qk_norm = generation >= 3
    c.max_seq_len = int(hf.get("max_position_embeddings", 8192))
    if generation >= 2:
        c.sliding_window = int(hf.get("sliding_window") or 0)
        c.sliding_window_pattern = _pattern(hf, generation, c.num_layers)
    full = rope_settings(hf, "full_attention")
    c.rope_theta = float(full.get("rope_theta") or (1_000_000.0 if generation == 3 else 10_000.0))
    kind = full.get("rope_type", "default")
    if kind == "linear":
        c.rope_scaling_type, c.rope_scaling_factor = "linear", float(full["factor"])
    elif kind not in ("default", None):
        raise CheckpointFormatError(f"unsupported rope_type {kind!r} for Gemma")
    if generation == 3:
        local = rope_settings(hf, "sliding_attention")
        theta = local.get("rope_theta") if "rope_parameters" in hf else hf.get("rope_local_base_freq")
        c.rope_local_theta = float(theta or 10_000.0)
    else:
        c.rope_local_theta = c.rope_theta
    c.pad_token_id = first_id(hf.get("pad_token_id"), 0)
    c.eos_token_id = first_id(hf.get("eos_token_id"), 1)
    c.bos_token_id = first_id(hf.get("bos_token_id"), 2)
    c.tokenizer = "sentencepiece"
    try:
        return from_dict(c.to_dict())
    except ConfigError as err:
        raise CheckpointFormatError(f"config.json: {err}") from None


def generation(config) -> int:
    """1, 2 or 3: the generations differ only in which of these a config turns on."""
    return 3 if config.use_qk_norm else 2 if config.use_post_attn_norm else 1


def config_to_hf(config) -> dict:
    """The transformers (v5) config.json of a Gemma config: the inverse of `config_from_hf`, so that the
    same architecture can be built in transformers (a benchmark's peer, an export)."""
    gen = generation(config)
    if config.activation != "gelu_tanh":
        raise ConfigError(f"Gemma in transformers uses gelu_tanh, not {config.activation!r}")
    hf = {
        "_name_or_path": config.name,
        "model_type": {1: "gemma", 2: "gemma2", 3: "gemma3_text"}[gen],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "tie_word_embeddings": True,
    }
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling_type == "linear":
        full = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor}
    if gen == 1:
        hf["rope_parameters"] = full
        return hf
    scalar = config.query_pre_attn_scalar
    hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar  # transformers types it int
    hf["attn_logit_softcapping"] = config.attn_logit_softcap or None
    hf["final_logit_softcapping"] = config.final_logit_softcap or None
    hf["sliding_window"] = config.sliding_window or None
    hf["layer_types"] = [f"{t}_attention" for t in config.layer_types]
    if gen == 2:
        hf["rope_parameters"] = full
    else:
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        hf["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    return hf


def _pattern(hf: dict, generation: int, num_layers: int) -> int:
    """The local/global period: every pattern-th layer global. Layers are scanned in periods, so an
    explicit `layer_types` list must follow one."""
    pattern = 2 if generation == 2 else int(hf.get("sliding_window_pattern", 6))
    listed = hf.get("layer_types")
    if listed:
        globals_at = [i for i, t in enumerate(listed) if t != "sliding_attention"]
        pattern = globals_at[0] + 1 if globals_at else num_layers + 1
        if tuple(listed) != tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(listed))
        ):
            raise CheckpointFormatError(
                f"config.json: layer_types {listed} do not repeat with a fixed period (not supported)"
            )
    return pattern


def _prefix(index: SafetensorsIndex) -> str:
    for prefix in _PREFIXES:
        if f"{prefix}embed_tokens.weight" in index:
            return prefix
    raise CheckpointFormatError(f"{index.directory}: no embed_tokens.weight under any of {_PREFIXES}")


def convert(src: Path, dst: Path, *, dtype=None, overwrite: bool = False, quantize: str | None = None) -> None:
    hf = read_hf_config(src)
    config = config_from_hf(hf)
    if quantize is not None:  # the writer quantizes every kernel the model stores quantized
        config = replace(config, quantization=check_format(quantize))
    if hf.get("tie_word_embeddings") is False:
        raise CheckpointFormatError(f"{src}: untied output embeddings are not a Gemma checkpoint")
    tensors = SafetensorsIndex(src)
    p = _prefix(tensors)
    d, h, kh, hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
    with CheckpointWriter(dst, config, overwrite=overwrite) as writer:

        def put(path, name, transform=lambda w: w, shape=None, *, index=None, count=0):
            w = tensors.get(name)
            if shape is not None and tuple(w.shape) != shape:
                raise CheckpointFormatError(f"{name}: shape {tuple(w.shape)} does not match the config ({shape})")
            out = np.ascontiguousarray(transform(w))
            writer.write_layer(path, index, count, out.astype(storage_dtype(w, dtype)))

        put(("embed", "embedding"), f"{p}embed_tokens.weight", shape=(config.vocab_size, d))
        put(("final_norm", "scale"), f"{p}norm.weight", shape=(d,))
        generation2 = config.use_post_attn_norm
        num_periods = config.num_layers // attention_period(config)
        for i in range(config.num_layers):
            L = f"{p}layers.{i}."
            prefix, index = layer_slot(config, i)

            def put_layer(path, name, transform=lambda w: w, shape=None):
                put(prefix + path, name, transform, shape, index=index, count=num_periods)

            put_layer(("attn_norm", "scale"), L + "input_layernorm.weight", shape=(d,))
            put_layer(
                ("attn", "q", "kernel"), L + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, hd), (h * hd, d)
            )
            put_layer(
                ("attn", "k", "kernel"), L + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, kh, hd), (kh * hd, d)
            )
            put_layer(
                ("attn", "v", "kernel"), L + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, kh, hd), (kh * hd, d)
            )
            put_layer(
                ("attn", "o", "kernel"), L + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d), (d, h * hd)
            )
            if config.use_qk_norm:
                put_layer(("attn", "q_norm", "scale"), L + "self_attn.q_norm.weight", shape=(hd,))
                put_layer(("attn", "k_norm", "scale"), L + "self_attn.k_norm.weight", shape=(hd,))
            if generation2:
                # Gemma 2/3 name the norm after attention "post_attention"; Gemma 1 (Llama naming)
                # uses that name for the norm before the MLP.
                put_layer(("post_attn_norm", "scale"), L + "post_attention_layernorm.weight", shape=(d,))
                put_layer(("mlp_norm", "scale"), L + "pre_feedforward_layernorm.weight", shape=(d,))
                put_layer(("post_mlp_norm", "scale"), L + "post_feedforward_layernorm.weight", shape=(d,))
            else:
                put_layer(("mlp_norm", "scale"), L + "post_attention_layernorm.weight", shape=(d,))
            put_layer(("mlp", "gate", "kernel"), L + "mlp.gate_proj.weight", lambda w: w.T, (config.ffn_dim, d))
            put_layer(("mlp", "up", "kernel"), L + "mlp.up_proj.weight", lambda w: w.T, (config.ffn_dim, d))
            put_layer(("mlp", "down", "kernel"), L + "mlp.down_proj.weight", lambda w: w.T, (d, config.ffn_dim))
        copy_tokenizer_files(src, writer)
