"""Grok-1 presets: the released 314B model (xai-org/grok-1) and small models of the same structure.

Field names are the shared vocabulary of every family; the comment after each names the release's
own field (run.py), so a value can be checked against it. See shared/docs/grok1.md.
"""

from __future__ import annotations

import math

import ml_collections

from vishwam_jax.presets import ConfigError, Family, register, register_family


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The release's expert width: int(widening_factor * d) * 2 // 3, rounded up to a multiple of 8
    (6144, 8 -> 32768). Kept beside the config so the converter can check shapes without a model."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


def grok1_base() -> ml_collections.ConfigDict:
    """Every field the Grok-1 forward reads, with the released values."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.family = "grok1"
    c.vocab_size = 128 * 1024
    c.d_model = 48 * 128  # the release's emb_size
    c.num_layers = 64
    c.num_heads = 48  # num_q_heads
    c.num_kv_heads = 8
    c.head_dim = 128  # key_size
    c.widening_factor = 8.0  # the release's knob for the expert width ...
    c.moe_ffn_dim = ffn_size(c.d_model, c.widening_factor)  # ... and the width it gives (32768): what the model reads
    c.num_experts = 8
    c.num_experts_per_token = 2  # num_selected_experts
    c.num_expert_slots = 0  # physical expert slots (0: one per expert; more: an EPLB placement's replicas)
    c.embedding_multiplier_scale = 78.38367176906169  # sqrt(6144)
    c.output_multiplier_scale = 0.5773502691896257  # 1/sqrt(3)
    c.attn_output_multiplier = 0.08838834764831845  # 1/sqrt(128): the only scaling of q.k
    c.attn_logit_softcap = 30.0  # hard-coded in the release: 30 * tanh(logits / 30)
    c.activation = "gelu_tanh"  # jax.nn.gelu's default (tanh approximation)
    c.norm_eps = 1e-5
    c.rope_theta = 10_000.0
    c.max_seq_len = 8192
    c.pad_token_id = 0
    c.eos_token_id = 2
    c.bos_token_id = 1
    c.tokenizer = "sentencepiece"  # the release's tokenizer.model (131072 pieces)
    c.remat_policy = "none"
    c.scan_unroll = 1  # layers per scan iteration (at least the depth: straight-line code)
    c.quantization = "none"  # matmul weights: "none" (float) | "int8" (per channel) | "fp8" (e4m3 blocks)
    c.quantization_block = (128, 128)  # fp8 block [rows, columns] of each matrix (DeepSeek's weight_block_size)
    c.quantization_activations = "none"  # "fp8": matmul inputs too, in 1 x block-rows tiles (DeepSeek's inference)
    return c


def _finalize(c: ml_collections.ConfigDict) -> None:
    if not 1 <= c.num_experts_per_token <= c.num_experts:
        raise ConfigError(
            f"num_experts_per_token={c.num_experts_per_token} must be between 1 and num_experts={c.num_experts}"
        )
    if c.num_expert_slots and c.num_expert_slots < c.num_experts:
        raise ConfigError(f"num_expert_slots={c.num_expert_slots} must be 0 or at least num_experts={c.num_experts}")
    if c.moe_ffn_dim < 1:
        raise ConfigError(f"moe_ffn_dim must be positive, got {c.moe_ffn_dim}")


register_family("grok1", Family(grok1_base, _finalize))


def layer_slot(config, i: int) -> tuple[tuple, int]:
    """Where layer i's parameters live in the stored tree: (path prefix, index on the stacked axis).
    Every Grok-1 layer has the same structure (attention + MoE), so all of them form one stack
    `layers` scanned in order: layer i is index i of every leaf under ("layers",)."""
    if not 0 <= i < config.num_layers:
        raise IndexError(f"layer {i} of a {config.num_layers}-layer Grok-1")
    return ("layers",), i


def _small(d: int, layers: int, q_heads: int, kv_heads: int, key_size: int, widening: float, experts: int, vocab: int):
    """Same structure as the release (GQA, 4 norms per layer, top-2 MoE in every layer, tied
    embeddings) at a reduced size; the multipliers follow the release's rules for the new sizes."""
    c = grok1_base()
    c.vocab_size, c.d_model, c.num_layers = vocab, d, layers
    c.num_heads, c.num_kv_heads, c.head_dim = q_heads, kv_heads, key_size
    c.widening_factor, c.num_experts = float(widening), experts
    c.moe_ffn_dim = ffn_size(d, widening)
    c.embedding_multiplier_scale = math.sqrt(d)
    c.attn_output_multiplier = 1.0 / math.sqrt(key_size)
    return c


@register("grok-1")
def _grok1():
    return grok1_base()


@register("grok-1-tiny")
def _grok1_tiny():
    """For tests: 12 layers, so that a checkpoint's lexicographic leaf order (decoder_layer_10
    before decoder_layer_2) differs from the numeric one."""
    c = _small(d=32, layers=12, q_heads=4, kv_heads=2, key_size=8, widening=2, experts=4, vocab=512)
    c.max_seq_len = 128
    # Text in and out without a tokenizer file (ids 3-255 are bytes; 0/1/2 keep the release's
    # pad/bos/eos, which are control characters no prompt contains).
    c.tokenizer = "bytes"
    return c


@register("grok-1-small")
def _grok1_small():
    """The demo size: the release's vocabulary (so the real tokenizer.model applies) and 8 experts,
    at d=512 over 8 layers (~140M parameters)."""
    c = _small(d=512, layers=8, q_heads=8, kv_heads=2, key_size=64, widening=2, experts=8, vocab=128 * 1024)
    c.max_seq_len = 2048
    return c
