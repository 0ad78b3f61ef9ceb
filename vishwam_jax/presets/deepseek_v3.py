"""DeepSeek-V3 presets: the released 671B model (config_671B.json of the official inference code,
config.json of deepseek-ai/DeepSeek-V3) and small models of the same structure.

Field names are ours (shared with the other families where the idea is shared: d_model, num_layers,
ffn_dim, ...); the comment after each names the release's field so values can be checked against it.
"""

from __future__ import annotations

import ml_collections

from vishwam_jax.presets import ConfigError, Family, register, register_family


def deepseek_v3_base() -> ml_collections.ConfigDict:
    """Every field the DeepSeek-V3 forward reads, with the released values."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.family = "deepseek_v3"
    c.vocab_size = 129_280
    c.d_model = 7168  # dim / hidden_size
    c.num_layers = 61  # n_layers / num_hidden_layers (the MTP module is extra)
    c.num_dense_layers = 3  # n_dense_layers / first_k_dense_replace: these use a plain SwiGLU MLP
    c.ffn_dim = 18_432  # inter_dim / intermediate_size (dense layers)
    # Multi-head latent attention.
    c.num_heads = 128  # n_heads
    c.q_lora_rank = 1536  # 0: queries projected directly from d_model (DeepSeek-V2-Lite style)
    c.kv_lora_rank = 512
    c.qk_nope_head_dim = 128
    c.qk_rope_head_dim = 64  # the rope part of k is one 64-dim vector per token, shared by all heads
    c.v_head_dim = 128
    # DeepSeekMoE.
    c.num_experts = 256  # n_routed_experts
    c.num_shared_experts = 1  # n_shared_experts: one always-on expert of width moe_ffn_dim * this
    c.moe_ffn_dim = 2048  # moe_inter_dim / moe_intermediate_size
    c.num_experts_per_token = 8  # n_activated_experts / num_experts_per_tok
    # Physical expert slots of the MoE layers (0: one per expert). More than num_experts holds an
    # EPLB placement's redundant replicas (sharding/placement.py); set by load(expert_placement=...).
    c.num_expert_slots = 0
    c.num_expert_groups = 8  # n_expert_groups / n_group
    c.num_groups_per_token = 4  # n_limited_groups / topk_group
    c.routed_scaling_factor = 2.5  # route_scale
    c.norm_topk_prob = True  # renormalize the selected gates to sum 1 before scaling
    c.activation = "silu"
    c.norm_eps = 1e-6
    # RoPE with YaRN (128K context from a 4K pre-training length).
    c.rope_theta = 10_000.0
    c.rope_scaling_type = "yarn"  # "yarn" | "none"
    c.rope_scaling_factor = 40.0
    c.rope_original_max_len = 4096  # original_seq_len / original_max_position_embeddings
    c.rope_beta_fast = 32.0
    c.rope_beta_slow = 1.0
    c.rope_mscale = 1.0
    c.rope_mscale_all_dim = 1.0
    # The official code rotates interleaved pairs (x[2i], x[2i+1]); checkpoints whose rope columns
    # were permuted to halves (transformers' rope_interleave=False) rotate (x[i], x[i + d/2]).
    c.rope_interleaved = True
    c.num_mtp_layers = 1  # num_nextn_predict_layers: multi-token-prediction depth
    c.max_seq_len = 163_840  # max_position_embeddings (4096 * 40)
    # The release's tokenizer_config pads with <｜end▁of▁sentence｜>.
    c.pad_token_id = 1
    c.eos_token_id = 1
    c.bos_token_id = 0
    c.tokenizer = "hf"
    c.remat_policy = "none"
    c.scan_unroll = 1  # layers per scan iteration (at least the depth: straight-line code)
    c.quantization = "none"  # matmul weights: "none" (float) | "int8" (per channel) | "fp8" (e4m3 blocks)
    c.quantization_block = (128, 128)  # fp8 block [rows, columns] of each matrix (DeepSeek's weight_block_size)
    c.quantization_activations = "none"  # "fp8": matmul inputs too, in 1 x block-rows tiles (DeepSeek's inference)
    # Derived (the shared vocabulary's view of MLA): every head has its own keys after decompression,
    # and a query-key dot product spans the nope and rope parts.
    c.num_kv_heads = c.num_heads
    c.head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    return c


def _finalize(c: ml_collections.ConfigDict) -> None:
    c.num_kv_heads = c.num_heads
    c.head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    if not 0 <= c.num_dense_layers <= c.num_layers:
        raise ConfigError(f"num_dense_layers={c.num_dense_layers} must be between 0 and num_layers={c.num_layers}")
    if c.num_experts % c.num_expert_groups:
        raise ConfigError(f"num_expert_groups={c.num_expert_groups} does not divide num_experts={c.num_experts}")
    if c.num_expert_slots and c.num_expert_slots < c.num_experts:
        raise ConfigError(f"num_expert_slots={c.num_expert_slots} must be 0 or at least num_experts={c.num_experts}")
    if not 1 <= c.num_groups_per_token <= c.num_expert_groups:
        raise ConfigError(
            f"num_groups_per_token={c.num_groups_per_token} must be between 1 and "
            f"num_expert_groups={c.num_expert_groups}"
        )
    per_group = c.num_experts // c.num_expert_groups
    if c.num_experts_per_token > c.num_groups_per_token * per_group:
        raise ConfigError(
            f"num_experts_per_token={c.num_experts_per_token} exceeds the {c.num_groups_per_token * per_group} experts "
            "of the groups a token may use"
        )
    if c.num_mtp_layers < 0:
        raise ConfigError(f"num_mtp_layers must be >= 0, got {c.num_mtp_layers}")


register_family("deepseek_v3", Family(deepseek_v3_base, _finalize, derived=("num_kv_heads", "head_dim")))


def layer_slot(config, i: int) -> tuple[tuple, int, int]:
    """Where decoder layer i's parameters live in the stored tree: (path prefix, index on the stacked
    axis, layers in that stack). The first num_dense_layers layers (SwiGLU) form the stack
    `dense_layers`, the rest (MoE) the stack `moe_layers`, each scanned in order."""
    dense, total = config.num_dense_layers, config.num_layers
    if not 0 <= i < total:
        raise IndexError(f"layer {i} of a {total}-layer DeepSeek-V3")
    if i < dense:
        return ("dense_layers",), i, dense
    return ("moe_layers",), i - dense, total - dense


def mtp_slot(config, k: int) -> tuple[tuple, int, int]:
    """(path prefix, stack index, stack size) of MTP depth k (0-based): the stack `mtp_layers`."""
    if not 0 <= k < config.num_mtp_layers:
        raise IndexError(f"MTP depth {k} of {config.num_mtp_layers}")
    return ("mtp_layers",), k, config.num_mtp_layers


@register("deepseek-v3-671b")
def _deepseek_v3_671b():
    return deepseek_v3_base()


@register("deepseek-v3-tiny")
def _deepseek_v3_tiny():
    """For tests: one dense layer then two MoE layers, 16 experts in 4 groups (2 chosen per token),
    YaRN on with a short original context so that the ramp covers several frequency pairs."""
    c = deepseek_v3_base()
    c.vocab_size, c.d_model, c.num_layers, c.num_dense_layers, c.ffn_dim = 256, 64, 3, 1, 128
    c.num_heads, c.q_lora_rank, c.kv_lora_rank = 4, 32, 32
    c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = 16, 8, 16
    c.num_experts, c.moe_ffn_dim, c.num_experts_per_token = 16, 32, 4
    c.num_expert_groups, c.num_groups_per_token = 4, 2
    c.rope_scaling_factor, c.rope_original_max_len = 4.0, 64
    c.max_seq_len = 256
    c.pad_token_id, c.eos_token_id, c.bos_token_id = 0, 1, 2
    c.tokenizer = "bytes"
    return c


@register("deepseek-v3-small")
def _deepseek_v3_small():
    """The full-width layers at reduced depth (1 dense + 3 MoE, all 256 experts, no MTP): what one
    H100 holds in bfloat16 (~74 GB), for decode benchmarks (scripts/benchmark_deepseek.py)."""
    c = deepseek_v3_base()
    c.num_layers, c.num_dense_layers, c.num_mtp_layers = 4, 1, 0
    c.max_seq_len = 4096
    return c
