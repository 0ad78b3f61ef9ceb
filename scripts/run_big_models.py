"""DeepSeek-V3 and Grok-1 at their published widths, sharded over every device of one host:
prefill / decode throughput, time to first token, memory per device and the collective share.

    # 8×H200 (issue 8): full depth, DeepSeek-V3 expert-parallel (32 experts per GPU) in int8,
    # Grok-1 tensor-parallel in bf16
    NCCL_NVLS_ENABLE=0 python scripts/run_big_models.py --json $OUT/big.json
    # one H100, reduced depth
    python scripts/run_big_models.py --layers 4 --grok-layers 6 --json $OUT/big.json
    # 8 simulated CPU devices, tiny widths (the same meshes, rules and code paths)
    python scripts/run_big_models.py --cpu-devices 8 --tiny --layers 2 --grok-layers 2

Weights are random (no checkpoint can be downloaded) and created directly sharded: the parameter
state of `models.abstract(config)` (nnx.eval_shape: shapes and logical axes, no memory) gives each
Param's NamedSharding (`param_shardings`), and each leaf comes from its own
`jax.jit(init, out_shardings=...)`, so no device and not the host ever holds a whole parameter.
int8 weights are the family's own weight-only int8 model (`quantization="int8"`).
Layouts (docs/scaling.md): DeepSeek-V3 on `make_mesh(expert=N)` with `RULES["tensor"]`
(experts split, attention data-parallel over the batch); Grok-1 on `make_mesh(tensor=N)` with
`RULES["tensor"]` (heads, expert width and vocabulary split). `--mesh` overrides either.

Measured: prefill tokens/s of one prompt of 1K and 8K tokens (its time is the time to first
token), decode tokens/s of one step at batch 1/8/64 with a 4K cache, device memory (peak and in
use, where the backend reports it; else the parameter + cache bytes of device 0), and the share of
a decode step that its collectives take when run alone (the same all-to-all / all-reduce shapes as
the step's MoE exchanges or tensor-parallel reductions, timed in isolation: an estimate, since in
the step they may overlap compute). Compared with the weight-bytes / bandwidth roofline (bandwidth
measured in the same run) and the seed figures of issue 8.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

SEED = {  # per-stream decode tok/s, memory GB, latency ms we aim to beat (issue 8)
    "deepseek_v3": {"tok_s": 32, "memory_gb": 120, "latency_ms": 125},
    "grok1": {"tok_s": 28, "memory_gb": 80, "latency_ms": 145},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deepseek-v3", "grok-1"], choices=["deepseek-v3", "grok-1"])
    ap.add_argument("--layers", type=int, default=None, help="DeepSeek-V3 depth (default: published, 61)")
    ap.add_argument(
        "--dense-layers", type=int, default=None, help="DeepSeek-V3 leading dense layers (default: min(3, layers - 1))"
    )
    ap.add_argument(
        "--grok-layers", type=int, default=None, help="Grok-1 depth (default: --layers, else published, 64)"
    )
    ap.add_argument(
        "--deepseek-weights",
        choices=["int8", "bf16"],
        default=None,
        help="default: int8 where the family's config accepts quantization='int8', else bf16 "
        "(bf16 does not fit 8×141 GB at full depth)",
    )
    ap.add_argument("--grok-weights", choices=["int8", "bf16"], default="bf16")
    ap.add_argument(
        "--mesh", default=None, help='override both layouts, e.g. "tensor=2,expert=4" (axes data, fsdp, tensor, expert)'
    )
    ap.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    ap.add_argument("--cpu-devices", type=int, default=None, help="simulate N CPU devices (sets XLA_FLAGS; CPU only)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (the -tiny presets, made divisible by 8 devices)")
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--cache-len", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=8, help="timed decode steps per batch size (median)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also trace the first prefill and 3 decode steps per batch size; report device 0's time per kernel",
    )
    ap.add_argument(
        "--moe-exchange",
        choices=["auto", "ragged", "dense"],
        default="auto",
        help="expert-parallel all-to-all (use_mesh's moe_all_to_all)",
    )
    ap.add_argument(
        "--moe-micro-batches",
        type=int,
        default=1,
        help="dispatch each device's tokens in this many micro-batches, so an exchange can overlap expert compute",
    )
    ap.add_argument("--json", default=None, help="also write the results here (rewritten after every measurement)")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.cpu_devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.cpu_devices}"
    )
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the weights take most of each card

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from scaling_plan import matrix_fan_ins  # noqa: E402  (scripts/: the Linears' fan-ins from their einsums)

from vishwam_jax import models  # noqa: E402
from vishwam_jax.presets import ConfigError, get_config  # noqa: E402
from vishwam_jax.sharding import RULES, logical_axes, make_mesh, param_shardings, parse_mesh, use_mesh  # noqa: E402
from vishwam_jax.sharding.context import shard_map  # noqa: E402
from vishwam_jax.sharding.rules import spec_for  # noqa: E402
from vishwam_jax.utils.benchmarking import read_bandwidth  # noqa: E402
from vishwam_jax.utils.profiling import format_summary, profile_device_ops, summarize_trace  # noqa: E402

RESULTS: dict = {"argv": sys.argv[1:], "runs": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def save() -> None:
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(RESULTS, f, indent=1)


# -- configs -----------------------------------------------------------------------------------------
def _quantization(weights: str) -> dict:
    return {"quantization": "int8"} if weights == "int8" else {}


def deepseek_weights() -> str:
    """--deepseek-weights, or int8 where the DeepSeek-V3 config accepts it (else bf16, said in the log)."""
    if ARGS.deepseek_weights:
        return ARGS.deepseek_weights
    try:
        get_config("deepseek-v3-tiny", quantization="int8")
        return "int8"
    except ConfigError as err:
        log(f"[deepseek-v3] bf16 weights: {err}")
        return "bf16"


def deepseek_config(weights: str):
    name = "deepseek-v3-tiny" if ARGS.tiny else "deepseek-v3-671b"
    base = get_config(name)
    layers = ARGS.layers if ARGS.layers is not None else base.num_layers
    dense = ARGS.dense_layers if ARGS.dense_layers is not None else min(base.num_dense_layers, max(layers - 1, 0))
    return get_config(
        name,
        num_layers=layers,
        num_dense_layers=min(dense, layers),
        num_mtp_layers=0,  # serving: the MTP module is only for speculative decoding
        max_seq_len=max(base.max_seq_len, ARGS.cache_len + 64, max(ARGS.prefill)),
        **_quantization(weights),
    )


def grok_config(weights: str):
    name = "grok-1-tiny" if ARGS.tiny else "grok-1"
    base = get_config(name)
    layers = ARGS.grok_layers if ARGS.grok_layers is not None else ARGS.layers
    overrides = {"num_layers": layers} if layers is not None else {}
    if ARGS.tiny:  # the tiny preset has 4 query heads and 4 experts: make both divide 8 devices
        overrides.update(num_heads=8, num_experts=8)
    return get_config(
        name,
        max_seq_len=max(base.max_seq_len, ARGS.cache_len + 64, max(ARGS.prefill)),
        **overrides,
        **_quantization(weights),
    )


# -- directly-sharded random weights ---------------------------------------------------------------
def abstract_model(config) -> tuple[nnx.Module, nnx.GraphDef, nnx.State]:
    """The family module with bf16 ShapeDtypeStructs for parameters (int8 kernels + float32 scales
    under quantization="int8"), its graphdef and its Param state."""
    module = models.abstract(config, jnp.bfloat16)
    graphdef, state = nnx.split(module, nnx.Param)
    return module, graphdef, state


@functools.cache
def _leaf_init(kind: str, shape: tuple, dtype, sharding, std: float):
    def init(key):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        # Drawn in the stored dtype: a float32 / int32 draw of a 3.8 G-entry expert stack would need
        # 15 GB of scratch on one device.
        if kind == "int8":
            return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint8), jnp.int8)
        if kind == "scale":  # uniform int8 has std ~74: scales give the dequantized weight std `std`
            return jnp.full(shape, std / 74.0, dtype)
        return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)

    return jax.jit(init, out_shardings=sharding)


def _is_param(x) -> bool:
    return isinstance(x, nnx.Variable)


def random_params(module, state: nnx.State, shardings: nnx.State, seed: int = 0) -> nnx.State:
    """Random values for the Param state, each leaf created directly with its sharding. What a leaf
    is comes from the model's structure, not from its name: norm scales (logical axis "norm") are
    1, other vectors (the router's balancing bias) 0; a Linear's kernel is drawn with std
    1/sqrt(fan-in) from its own einsum (int8: uniform random bytes, its `scale` beside it giving the
    same std); other matrices (embedding, routers) with 1/sqrt(d)."""
    key = jax.random.key(seed)
    fan_ins = matrix_fan_ins(module)
    linears = {path[:-1]: fan_in for path, fan_in in fan_ins.items()}  # Linear module path -> fan-in
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_param)
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    flat_names = jax.tree_util.tree_leaves(logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))
    out = []
    for i, ((keypath, variable), sharding, names) in enumerate(zip(flat, flat_shardings, flat_names)):
        path = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)
        s = variable.get_value()
        per_layer = [n for n in names if n != "layers"]
        if path in fan_ins:
            kind = "int8" if s.dtype == jnp.int8 else "normal"
            std = fan_ins[path] ** -0.5
        elif path[:-1] in linears:  # an int8 Linear's per-output-channel scale
            kind, std = "scale", linears[path[:-1]] ** -0.5
        elif per_layer[-1:] == ["norm"]:
            kind, std = "ones", 0.0
        elif len(per_layer) == 1:
            kind, std = "zeros", 0.0
        else:
            kind, std = "normal", s.shape[names.index("embed")] ** -0.5
        value = _leaf_init(kind, tuple(s.shape), s.dtype, sharding, float(std))(jax.random.fold_in(key, i))
        out.append(variable.replace(value))
    return jax.tree_util.tree_unflatten(treedef, out)


# -- placement of caches and inputs ------------------------------------------------------------------
def cache_shardings(cache, mesh, rules):
    """Batch over the rules' batch axes, KV heads over tensor (where they divide). Every cache leaf
    but "pos" belongs to a stack of layers (its leading axis, never split): per layer, [b, slots]
    slot positions, [b, slots, c] latent rows (MLA) or [b, slots, kv_heads, head_dim] keys/values."""
    per_layer = {2: ("batch", "length"), 3: ("batch", "length", None), 4: ("batch", "length", "kv_heads", "head_dim")}

    def one(path, x):
        names = ("batch",) if path[0].key == "pos" else ("layers",) + per_layer[x.ndim - 1]
        return NamedSharding(mesh, spec_for(names, tuple(x.shape), mesh, rules.activations, strict=False))

    return jax.tree_util.tree_map_with_path(one, cache)


def device_memory() -> dict:
    """GB per device, the largest over the devices (empty where the backend reports nothing, e.g. CPU)."""
    out: dict = {}
    for dev in jax.devices():
        stats = dev.memory_stats() or {}
        for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
            if k in stats:
                out[k] = max(out.get(k, 0.0), stats[k] / 1e9)
    return out


def shard_bytes(tree) -> float:
    """Bytes of device 0's shards of `tree`."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards if s.device == dev)


def timed(fn, *args, iters: int = 3):
    out = jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


# -- collectives of one decode step, timed alone ------------------------------------------------------
def collective_time(config, mesh, batch: int) -> tuple[str, float]:
    sizes = dict(mesh.shape)
    ep, tp = sizes.get("expert", 1), sizes.get("tensor", 1)
    d = config.d_model
    moe_layers = config.num_layers - config.get("num_dense_layers", 0)
    k = config.num_experts_per_token
    if ep > 1:
        # The dense exchange's buffers: [ep, cap, d] per device with cap = local tokens ×
        # min(k, experts per device) (capacity-free), sent and returned once per MoE layer.
        token_shards = math.prod(s for a, s in sizes.items() if a in ("data", "fsdp", "expert"))
        cap = math.ceil(batch / token_shards) * min(k, config.num_experts // ep)
        buf = jnp.zeros((token_shards * ep, cap, d), jnp.bfloat16)
        spec = PartitionSpec(tuple(a for a in ("data", "fsdp", "expert") if sizes.get(a, 1) > 1))

        def body(x):
            for _ in range(2 * moe_layers):
                x = jax.lax.all_to_all(x, "expert", 0, 0) * 1.0001  # keep each exchange distinct
            return x

        # On GPU/TPU the step's exchange is ragged (only routed rows travel): this bounds it from above.
        what = f"{2 * moe_layers} dense all-to-alls of [{ep}, {cap}, {d}] bf16"
    elif tp > 1:
        buf = jnp.zeros((tp, batch, d), jnp.bfloat16)
        spec = PartitionSpec("tensor")
        layers = config.num_layers

        def body(x):
            for _ in range(2 * layers):
                x = jax.lax.psum(x, "tensor") * 0.5
            return x

        what = f"{2 * layers} all-reduces of [{batch}, {d}] bf16"
    else:
        return "none (one device)", 0.0
    buf = jax.device_put(buf, NamedSharding(mesh, spec))
    fn = jax.jit(shard_map(body, mesh, in_specs=spec, out_specs=spec))
    seconds, _ = timed(fn, buf, iters=5)
    return what, seconds


# -- one model ----------------------------------------------------------------------------------------
def run_model(name: str, config, weights: str, mesh, rules) -> dict:
    module, graphdef, abstract = abstract_model(config)
    res = {
        "model": name,
        "layers": config.num_layers,
        "weights": weights,
        "mesh": dict(mesh.shape),
        "rules": rules.name,
        "moe_exchange": ARGS.moe_exchange,
        "devices": mesh.devices.size,
        "device_kind": jax.devices()[0].device_kind,
    }
    RESULTS["runs"].append(res)
    shardings = param_shardings(abstract, mesh, rules, config)
    t = time.perf_counter()
    params = random_params(module, abstract, shardings)
    jax.block_until_ready(params)
    res["init_s"] = time.perf_counter() - t
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    res["param_gb_total"] = total / 1e9
    res["param_gb_device0"] = shard_bytes(params) / 1e9
    res["memory_after_init_gb"] = device_memory()
    log(
        f"[{name}] {config.num_layers} layers, {weights}, mesh {dict(mesh.shape)} rules {rules.name}: "
        f"{total / 1e9:.4g} GB of weights, {res['param_gb_device0']:.4g} GB on device 0, init {res['init_s']:.1f} s"
    )
    save()

    vocab_hi = min(config.vocab_size, 30000)
    rng = np.random.default_rng(0)
    cache_dtype = jnp.bfloat16

    def make_cache(batch, slots):
        abstract_cache = jax.eval_shape(lambda: module.init_cache(batch, slots, cache_dtype))
        sh = cache_shardings(abstract_cache, mesh, rules)
        return jax.jit(lambda: module.init_cache(batch, slots, cache_dtype), out_shardings=sh)(), sh

    with use_mesh(mesh, rules, moe_all_to_all=ARGS.moe_exchange, moe_micro_batches=ARGS.moe_micro_batches):
        # Prefill: one prompt into a fresh cache, logits of its last position (the engine's prefill).
        def prefill_body(p, tokens, cache):
            last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)
            out = models.apply(graphdef, p, tokens, cache=cache, logit_positions=last)
            return jnp.argmax(out.logits[:, -1], -1), out.cache

        res["prefill"] = []
        for length in ARGS.prefill:
            tokens = jnp.asarray(rng.integers(3, vocab_hi, (1, length)), jnp.int32)
            times = []
            prefill = None
            for i in range(3):  # first call compiles
                cache, sh = make_cache(1, length)
                prefill = prefill or jax.jit(
                    prefill_body, donate_argnums=2, out_shardings=(NamedSharding(mesh, PartitionSpec()), sh)
                )
                jax.block_until_ready(cache)
                t = time.perf_counter()
                jax.block_until_ready(prefill(params, tokens, cache))
                times.append(time.perf_counter() - t)
                del cache
            s = float(np.median(times[1:]))
            res["prefill"].append(
                {"tokens": length, "seconds": s, "tok_s": length / s, "ttft_ms": s * 1e3, "compile_s": times[0] - s}
            )
            log(f"[{name}] prefill {length:>5} tokens: {length / s:,.0f} tok/s, time to first token {s * 1e3:,.1f} ms")
            if ARGS.profile and length == ARGS.prefill[0]:

                def one_prefill():
                    fresh, _ = make_cache(1, length)
                    return prefill(params, tokens, fresh)[0]

                summary = profile_device_ops(one_prefill, calls=1)
                res["prefill"][-1]["profile"] = _profile_row(summary)
                log(f"[{name}] prefill {length} profile (cache creation included), " + format_summary(summary, top=12))
            save()

        # Decode: one token per row against a cache holding cache_len positions.
        def decode_body(p, tokens, cache):
            out = models.apply(graphdef, p, tokens, cache=cache)
            return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)[:, None], out.cache

        res["decode"] = []
        replicated = NamedSharding(mesh, PartitionSpec())
        for batch in ARGS.batches:
            cache, sh = make_cache(batch, ARGS.cache_len + ARGS.decode_steps + 12)  # + warm-up and profiled steps
            # The cache comes back placed as it went in, so step 2 reuses step 1's compilation.
            decode = jax.jit(decode_body, donate_argnums=2, out_shardings=(replicated, sh))
            # The cache's contents do not change the cost; its length does: mark cache_len positions filled.
            cache = dict(cache)
            cache["pos"] = jax.device_put(jnp.full((batch,), ARGS.cache_len, jnp.int32), sh["pos"])
            cache = {k: v if k == "pos" else _mark_filled(v, ARGS.cache_len, sh[k]) for k, v in cache.items()}
            token = jax.device_put(jnp.asarray(rng.integers(3, vocab_hi, (batch, 1)), jnp.int32), replicated)
            t = time.perf_counter()
            token, cache = decode(params, token, cache)
            jax.block_until_ready(token)
            compile_s = time.perf_counter() - t
            token, cache = decode(params, token, cache)  # one more untimed step (allocator warm-up)
            times = []
            for _ in range(ARGS.decode_steps):
                t = time.perf_counter()
                token, cache = decode(params, token, cache)
                jax.block_until_ready(token)
                times.append(time.perf_counter() - t)
            step = float(np.median(times))
            what, coll = collective_time(config, mesh, batch)
            row = {
                "batch": batch,
                "cache_len": ARGS.cache_len,
                "step_ms": step * 1e3,
                "tok_s": batch / step,
                "tok_s_per_stream": 1 / step,
                "collectives": what,
                "collective_ms_alone": coll * 1e3,
                "collective_share": coll / step,
                "compile_s": compile_s,
                "memory_gb": device_memory(),
                "cache_gb_device0": shard_bytes(cache) / 1e9,
            }
            res["decode"].append(row)
            log(
                f"[{name}] decode batch {batch:>3} @ {ARGS.cache_len} cache: step {step * 1e3:,.2f} ms, "
                f"{batch / step:,.1f} tok/s "
                f"({1 / step:,.1f} per stream); collectives alone {coll * 1e3:,.2f} ms = {coll / step:.0%} "
                f"of the step [{what}]"
            )
            if ARGS.profile:
                state = {"token": token, "cache": cache}

                def one_step():
                    state["token"], state["cache"] = decode(params, state["token"], state["cache"])
                    return state["token"]

                summary = profile_device_ops(one_step, calls=3)
                cache = state["cache"]
                row["profile"] = _profile_row(summary)
                log(f"[{name}] decode batch {batch} profile, " + format_summary(summary, top=12))
                if mesh.devices.size > 1:  # the last device too: a collective's wait shows up on the early one
                    last = summarize_trace(summary["trace"], calls=3, device=mesh.devices.size - 1)
                    row["profile_last_device"] = _profile_row(last)
                    log(f"[{name}] decode batch {batch} profile, " + format_summary(last, top=6))
            del cache
            save()

    # Floor: bytes of device 0's weights / its measured read bandwidth (an upper bound on decode
    # speed at batch 1 for a dense read of everything it holds; MoE reads fewer expert bytes).
    bw = read_bandwidth().bytes_per_s
    res["read_bandwidth_gb_s"] = bw / 1e9
    res["roofline_step_ms_all_weights"] = res["param_gb_device0"] * 1e9 / bw * 1e3
    res["memory_final_gb"] = device_memory()
    res["seed"] = SEED[config.family]
    log(
        f"[{name}] read bandwidth {bw / 1e9:,.0f} GB/s: reading device 0's weights takes "
        f"{res['roofline_step_ms_all_weights']:,.2f} ms; "
        f"memory {res['memory_final_gb'] or 'not reported by this backend'}; seed per-stream {SEED[config.family]}"
    )
    save()
    params = None  # the next model needs the memory (closures above hold the name, so rebind rather than del)
    return res


def _profile_row(summary: dict) -> dict:
    return {"device": summary["device"], "busy_us_per_call": summary["busy_us_per_call"], "ops": summary["ops"][:25]}


def _mark_filled(stack: dict, n: int, shardings: dict) -> dict:
    """A stack's cache whose first n slots count as written in every layer (GQA caches record each
    slot's position, [layers, b, slots]; MLA's latent cache counts by "pos" alone)."""
    if "slot_pos" not in stack:
        return stack
    shape = stack["slot_pos"].shape
    pos = jnp.where(jnp.arange(shape[-1]) < n, jnp.arange(shape[-1]), -1)
    return {**stack, "slot_pos": jax.device_put(jnp.broadcast_to(pos, shape).astype(jnp.int32), shardings["slot_pos"])}


def main() -> None:
    devices = jax.devices()[: ARGS.devices] if ARGS.devices else jax.devices()
    n = len(devices)
    log(f"jax {jax.__version__}, {n} × {devices[0].device_kind} ({jax.default_backend()})")
    RESULTS["jax"] = jax.__version__
    for name in ARGS.models:
        weights = deepseek_weights() if name == "deepseek-v3" else ARGS.grok_weights
        config = deepseek_config(weights) if name == "deepseek-v3" else grok_config(weights)
        if ARGS.mesh:
            sizes = parse_mesh(ARGS.mesh)
        else:  # docs/scaling.md's serving layouts
            sizes = {"expert": n} if name == "deepseek-v3" else {"tensor": n}
        mesh = make_mesh(**sizes, devices=devices)
        run_model(name, config, weights, mesh, RULES["tensor"])


if __name__ == "__main__":
    main()
