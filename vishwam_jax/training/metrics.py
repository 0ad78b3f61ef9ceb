"""Throughput accounting for the per-step log line: model FLOPs, MFU and device memory.

Model FLOPs per trained token = 3 x forward = 6 N + 3 A, where N counts the weights each token
multiplies (for MoE only the experts it is routed to; the embedding lookup is not a matmul but the
output projection is) and A is the forward attention (q.k and p.v) averaged over the sequence's
causal, possibly windowed, context. Recomputation by activation checkpointing is not counted: MFU
measures useful work, not work done.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from vishwam_jax.quantization import SCALE_NAME
from vishwam_jax.training.lora import leaf_name

# Dense bf16 peak per chip (datasheets), matched against jax's device_kind, most specific first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def active_matmul_params(params: nnx.State, config, mtp_depths: int = 0) -> float:
    """Weights one token multiplies in a forward (see the module docstring), from the parameter
    state (concrete or abstract): every matrix but the embedding table (a lookup) and scales (norms,
    int8 scales); a weight with an "experts" axis counts only the routed share of its experts."""
    experts = config.get("num_experts") or 0
    chosen = config.get("num_experts_per_token") or 0
    total, untied = 0.0, False
    for path, v in nnx.to_flat_state(params):
        name = leaf_name(path)
        shape = tuple(v.get_value().shape)
        axes = tuple(v.get_metadata().get("out_sharding") or ())
        last = name.rsplit(".", 1)[-1]
        if last in ("embedding", "scale", SCALE_NAME) or len([a for a in axes if a != "layers"]) < 2:
            continue
        n = float(np.prod(shape))
        if "experts" in axes and experts:
            n *= chosen / experts
        untied = untied or "vocab" in axes
        total += n
    vocab_proj = config.vocab_size * config.d_model
    if not untied:  # tied: the embedding table is the output projection
        total += vocab_proj
    return total + mtp_depths * vocab_proj  # each MTP depth reuses the output head


def _mean_context(seq_len: int, window: int) -> float:
    """Keys each query sees, averaged over the sequence (causal, optionally windowed)."""
    ctx = np.arange(1, seq_len + 1)
    if window:
        ctx = np.minimum(ctx, window)
    return float(ctx.mean())


def attention_flops_per_token(config, seq_len: int, mtp_depths: int = 0) -> float:
    """Forward q.k and p.v FLOPs per token, summed over layers (and MTP blocks)."""
    heads, qk = config.num_heads, config.head_dim  # DeepSeek-V3: head_dim = qk_nope + qk_rope
    v = config.get("v_head_dim") or qk
    layer_types = config.get("layer_types") or ("full",) * config.num_layers
    window = config.get("sliding_window") or 0
    total = 0.0
    for i in range(config.num_layers):
        w = window if layer_types[i] == "sliding" else 0
        total += 2.0 * heads * (qk + v) * _mean_context(seq_len, w)
    total += mtp_depths * 2.0 * heads * (qk + v) * _mean_context(seq_len, 0)
    return total


def train_flops_per_token(params: nnx.State, config, seq_len: int, mtp_depths: int = 0) -> float:
    return 6.0 * active_matmul_params(params, config, mtp_depths) + 3.0 * attention_flops_per_token(
        config, seq_len, mtp_depths
    )


def memory_gib(device: jax.Device | None = None) -> tuple[float, float, float] | None:
    """(in use, peak, limit) GiB of one device, or None where the backend keeps no stats (CPU)."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    if not stats:
        return None
    gib = lambda k: stats.get(k, 0) / 2**30
    return gib("bytes_in_use"), gib("peak_bytes_in_use"), gib("bytes_limit")


def host_peak_rss_gib() -> float:
    """This process's peak resident memory (the CPU backend's arrays live there)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def format_step(
    step: int,
    metrics: dict,
    seconds: float,
    tokens: float,
    flops_per_token: float,
    num_devices: int,
    peak: float | None,
    note: str = "",
) -> str:
    """One log line: step, losses, gradient norm, lr, tokens/s, MFU, memory (and a note)."""
    parts = [f"step {step:6d}", f"loss {metrics['loss']:.4f}"]
    if "mtp" in metrics:
        parts.append(f"nll {metrics['nll']:.4f}  mtp {metrics['mtp']:.4f}")
    parts.append(f"gnorm {metrics['grad_norm']:.3f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "load_imbalance" in metrics:
        parts.append(f"load max/mean {metrics['load_imbalance']:.2f}")
    tps = tokens / max(seconds, 1e-9)
    parts.append(f"{tps:,.0f} tok/s")
    if peak:
        parts.append(f"MFU {100.0 * tps * flops_per_token / (peak * num_devices):.1f}%")
    else:
        parts.append(f"{tps * flops_per_token / num_devices / 1e12:.2f} TFLOP/s/dev")
    mem = memory_gib()
    if mem is not None:
        parts.append(f"mem {mem[0]:.1f}/{mem[2]:.1f} GiB (peak {mem[1]:.1f})")
    else:
        parts.append(f"host peak RSS {host_peak_rss_gib():.2f} GiB")
    if note:
        parts.append(note)
    return "  ".join(parts)
