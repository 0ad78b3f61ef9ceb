"""Gemma 1, 2 and 3 (text decoder) presets with the published dimensions, plus small test/demo ones.

The three generations differ only in configuration: norms around each block, soft-capping, the
sliding-window pattern, QK-norm and per-layer-type RoPE.
"""

from __future__ import annotations

import ml_collections

from vishwam_jax.presets import ConfigError, Family, register, register_family


def gemma_base() -> ml_collections.ConfigDict:
    """Every field the Gemma forward reads, with Gemma 1 values."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.family = "gemma"
    c.vocab_size = 256_000
    c.d_model = 2048
    c.num_layers = 18
    c.num_heads = 8
    c.num_kv_heads = 1
    c.head_dim = 256
    c.ffn_dim = 16_384
    c.activation = "gelu_tanh"
    c.norm_eps = 1e-6
    c.query_pre_attn_scalar = 256.0  # queries are scaled by its inverse square root
    c.attn_logit_softcap = 0.0  # 0 disables
    c.final_logit_softcap = 0.0
    c.use_post_attn_norm = False
    c.use_post_ffw_norm = False
    c.use_qk_norm = False
    c.sliding_window = 0  # 0: no sliding-window layers
    # Every sliding_window_pattern-th layer is global, the others sliding (Gemma 2: 2, Gemma 3: 6);
    # the layers are scanned in periods of this many. layer_types is derived from it.
    c.sliding_window_pattern = 1
    c.layer_types = ("full",) * c.num_layers  # derived: "full" | "sliding" per layer
    c.rope_theta = 10_000.0  # full-attention layers
    c.rope_local_theta = 10_000.0  # sliding-window layers
    c.rope_scaling_type = "none"  # full-attention layers: "none" | "linear"
    c.rope_scaling_factor = 1.0
    c.max_seq_len = 8192
    c.pad_token_id = 0
    c.eos_token_id = 1
    c.bos_token_id = 2
    c.tokenizer = "sentencepiece"  # "sentencepiece" | "hf" | "bytes"
    c.remat_policy = "none"
    c.scan_unroll = 1  # layers per scan iteration (at least the depth: straight-line code)
    c.quantization = "none"  # matmul weights: "none" (float) | "int8" (per channel) | "fp8" (e4m3 blocks)
    c.quantization_block = (128, 128)  # fp8 block [rows, columns] of each matrix (DeepSeek's weight_block_size)
    c.quantization_activations = "none"  # "fp8": matmul inputs too, in 1 x block-rows tiles (DeepSeek's inference)
    return c


def layer_types(num_layers: int, pattern: int, sliding_window: int) -> tuple[str, ...]:
    """Every `pattern`-th layer is global, the rest sliding-window (all global without a window)."""
    if not sliding_window:
        return ("full",) * num_layers
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


def attention_period(config) -> int:
    """Layers per scanned period: the local/global pattern (1 when every layer is global)."""
    return config.sliding_window_pattern if config.sliding_window else 1


def layer_slot(config, i: int) -> tuple[tuple, int | None]:
    """Where layer i's parameters live in the stored tree: (path prefix, index on the stacked axis or
    None for an unstacked tail layer). Layer i is position i % period of period i // period."""
    period = attention_period(config)
    full = config.num_layers // period * period
    if i < full:
        return ("blocks", "layers", i % period), i // period
    return ("tail", "layers", i - full), None


def _finalize(c: ml_collections.ConfigDict) -> None:
    if not isinstance(c.sliding_window_pattern, int) or c.sliding_window_pattern < 1:
        raise ConfigError(f"sliding_window_pattern must be a positive integer, got {c.sliding_window_pattern!r}")
    if c.sliding_window < 0:
        raise ConfigError(f"sliding_window must be >= 0, got {c.sliding_window}")
    c.layer_types = layer_types(c.num_layers, c.sliding_window_pattern, c.sliding_window)


register_family("gemma", Family(gemma_base, _finalize, derived=("layer_types",)))


def _gemma1(d, layers, heads, kv_heads, ffn) -> ml_collections.ConfigDict:
    c = gemma_base()
    c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.ffn_dim = d, layers, heads, kv_heads, ffn
    return c


def _gemma2(d, layers, heads, kv_heads, head_dim, ffn, qpas) -> ml_collections.ConfigDict:
    c = gemma_base()
    c.d_model, c.num_layers, c.num_heads, c.num_kv_heads = d, layers, heads, kv_heads
    c.head_dim, c.ffn_dim, c.query_pre_attn_scalar = head_dim, ffn, float(qpas)
    c.attn_logit_softcap, c.final_logit_softcap = 50.0, 30.0
    c.use_post_attn_norm = c.use_post_ffw_norm = True
    c.sliding_window, c.sliding_window_pattern = 4096, 2
    return c


def _gemma3(d, layers, heads, kv_heads, head_dim, ffn, qpas, window, vocab, scaling) -> ml_collections.ConfigDict:
    c = gemma_base()
    c.vocab_size = vocab
    c.d_model, c.num_layers, c.num_heads, c.num_kv_heads = d, layers, heads, kv_heads
    c.head_dim, c.ffn_dim, c.query_pre_attn_scalar = head_dim, ffn, float(qpas)
    c.use_post_attn_norm = c.use_post_ffw_norm = c.use_qk_norm = True
    c.sliding_window, c.sliding_window_pattern = window, 6
    c.rope_theta, c.rope_local_theta = 1_000_000.0, 10_000.0
    if scaling != 1.0:
        c.rope_scaling_type, c.rope_scaling_factor = "linear", float(scaling)
    c.max_seq_len = 32_768 if vocab == 262_144 else 131_072
    return c


register("gemma-2b")(lambda: _gemma1(2048, 18, 8, 1, 16_384))
register("gemma-7b")(lambda: _gemma1(3072, 28, 16, 16, 24_576))
register("gemma2-2b")(lambda: _gemma2(2304, 26, 8, 4, 256, 9216, 256))
register("gemma2-9b")(lambda: _gemma2(3584, 42, 16, 8, 256, 14_336, 256))
register("gemma2-27b")(lambda: _gemma2(4608, 46, 32, 16, 128, 36_864, 144))
register("gemma3-1b")(lambda: _gemma3(1152, 26, 4, 1, 256, 6912, 256, 512, 262_144, 1.0))
register("gemma3-4b")(lambda: _gemma3(2560, 34, 8, 4, 256, 10_240, 256, 1024, 262_208, 8.0))
register("gemma3-12b")(lambda: _gemma3(3840, 48, 16, 8, 256, 15_360, 256, 1024, 262_208, 8.0))
register("gemma3-27b")(lambda: _gemma3(5376, 62, 32, 16, 128, 21_504, 168, 1024, 262_208, 8.0))


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a preset to test size, keeping its structure (pattern, norms, caps, MQA/GQA)."""
    c.vocab_size, c.d_model, c.ffn_dim, c.head_dim = 256, 64, 128, 16
    c.query_pre_attn_scalar = 16.0
    c.max_seq_len = 256
    if c.sliding_window:
        c.sliding_window = 8
    c.tokenizer = "bytes"
    return c


@register("gemma-tiny")
def _gemma_tiny():
    c = _tiny(_gemma1(64, 2, 4, 1, 128))
    return c


@register("gemma2-tiny")
def _gemma2_tiny():
    return _tiny(_gemma2(64, 4, 4, 2, 16, 128, 16))


@register("gemma3-tiny")
def _gemma3_tiny():
    return _tiny(_gemma3(64, 6, 4, 2, 16, 128, 16, 8, 256, 8.0))


@register("gemma-shakespeare")
def _gemma_shakespeare():
    """The embedded demo: a byte-level Gemma-3-style model trained by scripts/train_demo.py."""
    c = gemma_base()
    c.vocab_size = 256 + 3  # bytes + pad/eos/bos
    c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim = 256, 4, 8, 2, 32, 640
    c.query_pre_attn_scalar = 32.0
    c.use_post_attn_norm = c.use_post_ffw_norm = c.use_qk_norm = True
    c.sliding_window, c.sliding_window_pattern = 128, 2
    c.rope_theta, c.rope_local_theta = 10_000.0, 10_000.0
    c.max_seq_len = 1024
    c.pad_token_id, c.eos_token_id, c.bos_token_id = 256, 257, 258
    c.tokenizer = "bytes"
    return c
