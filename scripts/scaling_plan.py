"""The arithmetic behind docs/scaling.md: per-device memory and per-step communication of DeepSeek-V3
671B and Grok-1 314B, trained on a TPU v5p slice and served on 8×H200.

Parameter shapes and their logical axes come from the registered presets (`models.abstract`: the
family's nnx.Module under nnx.eval_shape, nothing allocated), and per-device weight bytes from the
same `param_specs` of that parameter state that shards a real run (so a layout that does not divide
a dimension fails here exactly as it would on the pod). KV cache shapes come from each family's
init_cache. Activation and communication volumes are formulas written out next to the numbers they
produce: estimates, not measurements.

    python scripts/scaling_plan.py            # markdown tables (what docs/scaling.md shows)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from vishwam_jax import models
from vishwam_jax.models.layers import Linear
from vishwam_jax.presets import get_config, replace
from vishwam_jax.quantization import SCALE_NAME
from vishwam_jax.sharding import AXES, logical_axes, param_specs

GB = 1e9


@dataclass(frozen=True)
class Chip:
    name: str
    hbm: float  # bytes
    hbm_bw: float  # bytes/s
    flops: float  # dense bf16 FLOP/s
    link: float  # bytes/s one direction, per chip, over the interconnect (ICI / NVLink)


# Vendor figures: TPU v5p (cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s, 459 bf16
# TFLOP/s, 1200 GB/s bidirectional ICI per chip); H200 SXM (141 GB HBM3e, 4.8 TB/s, 989 dense bf16
# TFLOP/s, NVLink 4 900 GB/s bidirectional).
V5P = Chip("TPU v5p", 95e9, 2765e9, 459e12, 600e9)  # 95 GiB per the newest page; 95 GB is the safe reading
H200 = Chip("H200", 141e9, 4.8e12, 989e12, 450e9)


@dataclass(frozen=True)
class Layout:
    title: str
    preset: str
    chip: Chip
    mesh: dict
    rules: str
    phase: str  # "train" | "serve"
    # training
    global_batch: int = 0  # sequences per optimizer step
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per chip per forward/backward (gradient accumulation over the rest)
    capacity_factor: float | None = 2.0  # MoE exchange buffers: c × routed rows; None: capacity-free (c = ep)
    # serving
    weight_bytes: int = 2  # 1: weight-only int8 (per-output-channel f32 scales), 2: bf16
    # "fp8": the model's own quantized parameter state (float8 e4m3 matrices with float32 128 x 128
    # block scales; embeddings, norms, routers and DeepSeek's lm_head stay bf16), bytes leaf by leaf.
    quantization: str = "none"
    decode_batches: tuple = (1, 8, 64)
    cache_len: int = 4096
    prefill_tokens: int = 8192
    notes: tuple = field(default_factory=tuple)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.get(a, 1) for a in AXES)


def abstract_mesh(sizes: dict) -> AbstractMesh:
    shape = tuple(sizes.get(a, 1) for a in AXES)
    try:
        return AbstractMesh(shape, AXES)
    except TypeError:  # older jax: AbstractMesh(((name, size), ...))
        return AbstractMesh(tuple(zip(AXES, shape)))


def abstract_state(config, dtype=jnp.bfloat16) -> tuple[nnx.Module, nnx.State]:
    """The family module with ShapeDtypeStructs for parameters, and its Param state."""
    module = models.abstract(config, dtype)
    return module, nnx.state(module, nnx.Param)


def _einsum_contracted(spec: str) -> tuple[int, ...]:
    """Positions of the weight's (second operand's) letters that the einsum `spec` sums over."""
    inputs, out = spec.replace("...", "").split("->")
    weight = inputs.split(",")[1]
    return tuple(i for i, a in enumerate(weight) if a not in out)


def matrix_fan_ins(module: nnx.Module) -> dict[tuple, int]:
    """{path of a Linear's kernel: its fan-in}, the product of the weight dimensions its einsum
    contracts (an o projection [heads, head_dim, d]: heads × head_dim), read off each Linear's own
    spec, so no weight is recognised by its name. The routed experts' Linears (no spec: the sorted
    dispatch applies them, [e, in, out]) contract their dimension after `experts`. Paths are the
    module attribute paths of nnx.iter_graph; a stacked Linear's kernel has the stack axes in front.
    Embedding tables and routers are not Linears: they are never quantized."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, Linear):
            continue
        shape = tuple(node.kernel.get_value().shape)
        names = tuple(node.kernel.get_metadata()["out_sharding"])
        lead = names.count("layers")  # a stacked Linear: the stack axes in front of the einsum's weight
        dims = tuple(lead + i for i in _einsum_contracted(node.spec)) if node.spec else (names.index("experts") + 1,)
        out[tuple(path) + ("kernel",)] = math.prod(shape[i] for i in dims)
    return out


def _path(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


@dataclass
class ParamStats:
    total: float = 0  # parameters
    expert: float = 0  # routed-expert parameters
    per_device: float = 0  # parameters held by one device under the layout's rules
    per_device_gathered: float = 0  # parameters one device sees after the FSDP all-gathers
    largest_layer_gathered: float = 0  # the same, for the largest single layer (the all-gather working set)
    int8_scales: float = 0  # f32 scales per device if matrices are int8
    bytes_per_device: float = 0  # bytes one device holds, each leaf in its own dtype (quantized layouts)
    expert_bytes: float = 0  # bytes of all routed experts (values and scales), unsharded


def param_stats(config, layout: Layout) -> ParamStats:
    module, state = abstract_state(config)
    mesh = abstract_mesh(layout.mesh)
    sizes = {a: layout.mesh.get(a, 1) for a in AXES}
    specs = param_specs(state, mesh, layout.rules, config)  # raises, naming the dimension, if it does not divide
    names = logical_axes(state)
    fan_ins = matrix_fan_ins(module)
    # Paths end at each nnx.Param (not at its `.value` inside): the module attribute paths.
    flat = [
        (kp, v.get_value())
        for kp, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    ]
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_names = jax.tree_util.tree_leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    st = ParamStats()
    per_layer: dict[str, float] = {}
    fsdp_dims = {"embed", "q_lora", "kv_lora"}  # the dimensions the FSDP table shards (gathered per layer)
    for (keypath, leaf), spec, leaf_names in zip(flat, flat_specs, flat_names):
        path = _path(keypath)
        n = leaf.size
        nbytes = n * leaf.dtype.itemsize
        if "experts" in leaf_names:
            st.expert_bytes += nbytes
        if path[-1] == SCALE_NAME:  # a quantized kernel's scales: bytes, not parameters
            st.bytes_per_device += nbytes / _split(spec, leaf.ndim, sizes)
            continue
        st.total += n
        if "experts" in leaf_names:
            st.expert += n
        split = gathered_split = 1
        for dim_axes, logical in zip(tuple(spec) + (None,) * (leaf.ndim - len(spec)), leaf_names):
            axes = () if dim_axes is None else (dim_axes,) if isinstance(dim_axes, str) else tuple(dim_axes)
            s = math.prod(sizes[a] for a in axes)
            split *= s
            if logical not in fsdp_dims:
                gathered_split *= s
        st.per_device += n / split
        st.bytes_per_device += nbytes / split
        st.per_device_gathered += n / gathered_split
        if leaf_names[:1] == ("layers",):  # one slice of a scanned stack is one layer (or one MTP depth)
            per_layer[path[0]] = per_layer.get(path[0], 0) + n / gathered_split / leaf.shape[0]
        if path in fan_ins:  # weight-only int8: one float32 scale per output channel
            st.int8_scales += 4 * n / fan_ins[path] / split
    st.largest_layer_gathered = max(per_layer.values())
    return st


def _split(spec: PartitionSpec, ndim: int, sizes: dict) -> int:
    """How many ways a leaf with this spec is split over the mesh."""
    split = 1
    for dim_axes in tuple(spec) + (None,) * (ndim - len(spec)):
        axes = () if dim_axes is None else (dim_axes,) if isinstance(dim_axes, str) else tuple(dim_axes)
        split *= math.prod(sizes[a] for a in axes)
    return split


def active_params(config, st: ParamStats) -> float:
    return st.total - st.expert + st.expert * config.num_experts_per_token / config.num_experts


def moe_layers(config) -> int:
    if config.family == "deepseek_v3":
        return config.num_layers - config.num_dense_layers + config.num_mtp_layers
    return config.num_layers


def top_k(config) -> int:
    return config.num_experts_per_token


def cache_bytes_per_token(config) -> float:
    module = models.abstract(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: module.init_cache(1, 1, jnp.bfloat16))
    return sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(cache) if l.ndim >= 2)


def fmt_gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def fmt_s(x: float) -> str:
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


# -- training ----------------------------------------------------------------------------------------
def train_table(layout: Layout) -> str:
    config = get_config(layout.preset)
    st = param_stats(config, layout)
    n_dev, m = layout.devices, layout.mesh
    d, k = config.d_model, top_k(config)
    ep, tp = m.get("expert", 1), m.get("tensor", 1)
    seqs_per_chip = layout.global_batch * tp / n_dev  # tensor shards see the same sequences
    accum = seqs_per_chip / layout.micro_batch
    tokens_micro = layout.micro_batch * layout.seq_len  # tokens per chip per micro-batch
    heads = config.num_heads
    L = config.num_layers + config.get("num_mtp_layers", 0)
    rows = []
    add = lambda what, value, how: rows.append(f"| {what} | {value} | {how} |")

    # Memory: float32 master weights + Adam's two float32 moments + float32 gradients, all sharded.
    master = 4 * st.per_device
    adam = 8 * st.per_device
    grads = 4 * st.per_device
    gathered = 2 * 2 * st.largest_layer_gathered  # bf16, this layer + the next one prefetched
    saved = L * tokens_micro * d * 2  # full remat: one bf16 residual per layer boundary
    rows_routed = tokens_micro * k
    # The exchange's buffers (sent / received / regrouped / returned rows of width d, gate / up / hidden
    # rows of width f/tensor): each holds ep × cap rows, cap = c × rows / ep, or capacity-free the most
    # one source can send one device, tokens × min(k, E/ep) (a token's k experts are distinct).
    buf = lambda c: c * rows_routed * (4 * d + 3 * config.moe_ffn_dim / tp) * 2
    c_free = ep * min(k, config.num_experts // ep) / k
    c = c_free if layout.capacity_factor is None else layout.capacity_factor
    moe_buf = buf(c)
    vocab = config.vocab_size / tp
    logits = tokens_micro * vocab * 4 * 2  # float32 logits and their gradient
    flash = config.family == "deepseek_v3"  # MLA prefill/training attention is the Pallas flash kernel
    attn = 0 if flash else 2 * layout.micro_batch * heads / tp * layout.seq_len**2 * 4
    total = master + adam + grads + gathered + saved + moe_buf + logits + attn
    add(
        "parameters (total / active per token)",
        f"{st.total / 1e9:,.1f} B / {active_params(config, st) / 1e9:,.1f} B",
        "models.abstract (nnx.eval_shape)",
    )
    add("parameters per chip", f"{st.per_device / 1e9:,.3f} B", f"param_specs(rules={layout.rules!r})")
    add("float32 master weights", fmt_gb(master), "4 B × params per chip")
    add("Adam moments (float32 m, v)", fmt_gb(adam), "8 B × params per chip")
    add("float32 gradients", fmt_gb(grads), "4 B × params per chip")
    add(
        "bf16 weights gathered for compute",
        fmt_gb(gathered),
        f"2 layers × {st.largest_layer_gathered / 1e9:.2f} B params × 2 B (largest layer after the FSDP all-gather)",
    )
    add("saved activations (full remat)", fmt_gb(saved), f"{L} layers × {tokens_micro:,} tokens × d={d} × 2 B")
    cap_name = (
        f"capacity-free: c = ep·min(k, E/ep)/k = {c:g}"
        if layout.capacity_factor is None
        else f"capacity factor c = {c:g}"
    )
    add(
        f"MoE exchange buffers ({cap_name})",
        fmt_gb(moe_buf),
        f"c × {rows_routed:,} routed rows × (4·d + 3·f/tensor) × 2 B",
    )
    add("logits + their gradient", fmt_gb(logits), f"{tokens_micro:,} tokens × vocab/tensor={vocab:,.0f} × 4 B × 2")
    if attn:
        add(
            "attention scores (one layer)", fmt_gb(attn), f"2 × heads/tensor={heads // tp} × t²={layout.seq_len}² × 4 B"
        )
    else:
        add("attention scores", "O(t·h·d) only", "flash kernel (pallas_kernels.mla_attention): no t×t matrix")
    add("**total per chip**", f"**{fmt_gb(total)}** of {fmt_gb(layout.chip.hbm)}", "")
    if layout.capacity_factor is not None:
        add(
            "(capacity-free exchange instead)",
            fmt_gb(buf(c_free)),
            f"c = ep·min(k, E/ep)/k = {c_free:g}: the reason this layout sets a capacity factor",
        )

    # Communication per optimizer step, bytes received per chip.
    micro = accum
    ag = (
        2 * micro * 2 * (st.per_device_gathered - st.per_device)
    )  # all-gather bf16 weights in forward and again in the remat'd backward
    rs = micro * 4 * (st.per_device_gathered - st.per_device)  # reduce-scatter float32 gradients
    a2a = 0.0
    if ep > 1:
        # dispatch + return in forward, again in the remat recompute, and their transposes in backward;
        # ragged exchange: the routed rows only, (ep-1)/ep of them leave the chip.
        a2a = micro * 6 * moe_layers(config) * rows_routed * d * 2 * (ep - 1) / ep
    tp_ar = 0.0
    if tp > 1:
        # two all-reduces per layer (attention out, MLP out): forward, recompute, backward
        tp_ar = micro * 6 * L * 2 * (tp - 1) / tp * tokens_micro * d * 2
    dp = m.get("data", 1)
    dp_ar = 2 * (dp - 1) / dp * 4 * st.per_device if dp > 1 else 0.0
    flops = 6 * active_params(config, st) * layout.global_batch * layout.seq_len / n_dev
    t_compute = flops / layout.chip.flops
    comm = [
        ("FSDP all-gathers (bf16 weights, fwd + bwd)", ag),
        ("gradient reduce-scatter (f32)", rs),
        ("expert all-to-all (6 per MoE layer)", a2a),
        ("tensor all-reduces", tp_ar),
        ("data all-reduce", dp_ar),
    ]
    rows.append("| **communication per step (received per chip)** | | |")
    for what, b in comm:
        if b:
            add(what, fmt_gb(b), f"{fmt_s(b / layout.chip.link)} at {layout.chip.link / 1e9:.0f} GB/s")
    add(
        "compute per step per chip",
        f"{flops / 1e15:,.1f} PFLOP",
        f"6 × active params × tokens / chips: {fmt_s(t_compute)} at peak bf16",
    )

    head = (
        f"### {layout.title}\n\nMesh `make_mesh({', '.join(f'{a}={s}' for a, s in layout.mesh.items())})` "
        f"({n_dev} chips), rules `RULES[{layout.rules!r}]`; global batch {layout.global_batch:,} × "
        f"{layout.seq_len:,} tokens "
        f"= {layout.global_batch * layout.seq_len / 1e6:,.1f} M tokens per step; {seqs_per_chip:g} sequences "
        "per chip in "
        f"{accum:g} micro-batches of {layout.micro_batch}.\n"
    )
    notes = "".join(f"\n{n}\n" for n in layout.notes)
    return head + "\n| quantity | per chip | how |\n|---|---|---|\n" + "\n".join(rows) + "\n" + notes


# -- serving -----------------------------------------------------------------------------------------
def serve_table(layout: Layout) -> str:
    config = get_config(layout.preset)
    if layout.quantization != "none":
        config = replace(config, quantization=layout.quantization)
    st = param_stats(config, layout)
    n_dev, m = layout.devices, layout.mesh
    d, k = config.d_model, top_k(config)
    ep, tp = m.get("expert", 1), m.get("tensor", 1)
    dp_attn = (
        m.get("data", 1) * m.get("fsdp", 1) * ep
    )  # the batch axes of the rules (attention is data-parallel over them)
    kv_split = tp if config.family != "deepseek_v3" else 1  # MLA's latent cache has no head axis
    quantized = layout.quantization != "none"
    if quantized:  # every leaf in its stored dtype
        weights = st.bytes_per_device
    else:
        weights = layout.weight_bytes * st.per_device + (st.int8_scales if layout.weight_bytes == 1 else 0)
    per_tok = cache_bytes_per_token(config)
    rows = []
    add = lambda what, value, how: rows.append(f"| {what} | {value} | {how} |")
    fmt = "int8 (weight-only, f32 per-output-channel scales)" if layout.weight_bytes == 1 else "bf16"
    if layout.quantization == "fp8":
        fmt = "fp8 e4m3, f32 128×128 block scales; embeddings, norms, router, lm_head bf16"
    add(
        "parameters (total / active per token)",
        f"{st.total / 1e9:,.1f} B / {active_params(config, st) / 1e9:,.1f} B",
        "models.abstract (nnx.eval_shape)",
    )
    add(
        f"weights per GPU ({fmt})",
        fmt_gb(weights),
        f"{st.per_device / 1e9:,.2f} B params per GPU from param_specs(rules={layout.rules!r})"
        + (", bytes leaf by leaf in their stored dtypes" if quantized else ""),
    )
    add("KV cache per token (all layers)", f"{per_tok / 1e3:,.1f} KB", "eval_shape of init_cache, bf16")
    for b in layout.decode_batches:
        per_dev = per_tok * layout.cache_len * b / min(b, dp_attn) / kv_split if b >= 1 else 0
        add(
            f"KV cache, batch {b} × {layout.cache_len} tokens",
            fmt_gb(per_dev),
            f"batch over {min(b, dp_attn)} GPU(s)" + (f", kv heads over tensor={tp}" if kv_split > 1 else ""),
        )
    prefill_act = layout.prefill_tokens * (config.vocab_size / tp * 4 + 8 * d * 2)
    add(
        f"prefill working set ({layout.prefill_tokens:,} tokens)",
        fmt_gb(prefill_act),
        "f32 logits/tensor + ~8 residual-sized bf16 buffers (one layer at a time)",
    )
    biggest = (
        weights
        + prefill_act
        + per_tok * layout.cache_len * max(layout.decode_batches) / min(max(layout.decode_batches), dp_attn) / kv_split
    )
    add(
        "**peak per GPU (weights + batch-64 cache + prefill)**",
        f"**{fmt_gb(biggest)}** of {fmt_gb(layout.chip.hbm)}",
        "",
    )

    prefill_flops = 2 * active_params(config, st) * layout.prefill_tokens
    t_prefill = prefill_flops / (n_dev * layout.chip.flops)
    add(
        f"prefill {layout.prefill_tokens:,} tokens: compute roofline",
        fmt_s(t_prefill),
        f"2 × active params × tokens over {n_dev} GPUs at peak bf16: ≤ "
        f"{layout.prefill_tokens / t_prefill:,.0f} tok/s (attention FLOPs excluded)",
    )
    rows.append("| **per decode step** | | |")
    layers = config.num_layers
    for b in layout.decode_batches:
        # Weight bytes read per step on the busiest GPU (the roofline of a memory-bound decode step).
        experts_local = config.num_experts / ep
        touched = experts_local * (1 - (1 - k / config.num_experts) ** b)  # expected distinct local experts hit
        if quantized:
            expert_local_bytes = st.expert_bytes / max(ep, 1) / (tp if tp > 1 else 1)
            read = weights - expert_local_bytes + st.expert_bytes / config.num_experts / max(tp, 1) * touched
        else:
            dense_w = layout.weight_bytes * (st.per_device - st.expert / max(ep, 1) / (tp if tp > 1 else 1))
            per_expert = st.expert / config.num_experts / (tp if tp > 1 else 1)
            read = dense_w + layout.weight_bytes * per_expert * touched
        t_mem = read / layout.chip.hbm_bw
        if ep > 1:
            local_b = math.ceil(b / min(b, dp_attn))
            comm = moe_layers(config) * 2 * local_b * k * d * 2 * (ep - 1) / ep
            how = f"2 all-to-alls × {moe_layers(config)} MoE layers × {local_b} token(s) × k={k} × d × 2 B"
        else:
            comm = layers * 2 * 2 * (tp - 1) / tp * b * d * 2
            how = f"2 all-reduces × {layers} layers × {b} token(s) × d × 2 B × 2(tp-1)/tp"
        add(
            f"batch {b}: weights read / roofline",
            f"{fmt_gb(read)} / {fmt_s(t_mem)}",
            f"≤ {b / t_mem:,.0f} tok/s ({1 / t_mem:,.0f} per stream) at {layout.chip.hbm_bw / 1e12:.1f} TB/s",
        )
        add(
            f"batch {b}: communication",
            f"{comm / 1e6:,.2f} MB",
            f"{how}; {comm / layout.chip.link * 1e6:,.1f} µs of NVLink bandwidth (latency-bound in practice)",
        )
    head = (
        f"### {layout.title}\n\nMesh `make_mesh({', '.join(f'{a}={s}' for a, s in layout.mesh.items())})` "
        f"({n_dev} GPUs), rules `RULES[{layout.rules!r}]`.\n"
    )
    notes = "".join(f"\n{n}\n" for n in layout.notes)
    return head + "\n| quantity | per GPU | how |\n|---|---|---|\n" + "\n".join(rows) + "\n" + notes


LAYOUTS = [
    Layout(
        "DeepSeek-V3 671B: training on TPU v5p-2048 (1,024 chips, 8×8×16 torus)",
        "deepseek-v3-671b",
        V5P,
        {"fsdp": 16, "expert": 64},
        "expert",
        "train",
        global_batch=4096,
        seq_len=4096,
        micro_batch=1,
    ),
    Layout(
        "Grok-1 314B: training on TPU v5p-512 (256 chips, 4×8×8 torus)",
        "grok-1",
        V5P,
        {"fsdp": 8, "tensor": 4, "expert": 8},
        "expert",
        "train",
        global_batch=512,
        seq_len=8192,
        micro_batch=1,
        capacity_factor=None,
    ),
    Layout(
        "DeepSeek-V3 671B: serving on 8×H200 (expert-parallel MoE, data-parallel attention)",
        "deepseek-v3-671b",
        H200,
        {"expert": 8},
        "tensor",
        "serve",
        weight_bytes=1,
    ),
    Layout(
        "DeepSeek-V3 671B: serving on 8×H200 in FP8 as released (expert-parallel MoE, data-parallel attention)",
        "deepseek-v3-671b",
        H200,
        {"expert": 8},
        "tensor",
        "serve",
        quantization="fp8",
        notes=(
            'Why FP8: it is the release\'s own format (`convert(..., quantize="fp8")` keeps its bytes and '
            "block scales), as small as the int8 layout above, with no requantization error on top of "
            "DeepSeek's. The block-scaled grouped-matmul kernel reads the float8 experts and dense "
            "projections as stored, so decode reads one byte per weight; the bf16 embedding, lm_head and "
            "norms are the difference from the int8 row's bytes. Prefill runs the same weights "
            "weight-only (bf16 products; `gmm_fp8` puts both operands on the FP8 tensor cores at twice "
            "the bf16 peak where activation quantization is acceptable).",
        ),
    ),
    Layout(
        "Grok-1 314B: serving on 8×H200 (tensor-parallel, bf16)",
        "grok-1",
        H200,
        {"tensor": 8},
        "tensor",
        "serve",
        weight_bytes=2,
    ),
    Layout(
        "Grok-1 314B: serving on 8×H200 (tensor-parallel, int8 as released)",
        "grok-1",
        H200,
        {"tensor": 8},
        "tensor",
        "serve",
        weight_bytes=1,
    ),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    for layout in LAYOUTS:
        print(train_table(layout) if layout.phase == "train" else serve_table(layout))


if __name__ == "__main__":
    main()
