"""Decode tokens/s of a full-width, reduced-depth DeepSeek-V3 against the read-bandwidth floor, and
the latent KV cache's bytes per token against naive multi-head attention.

    python scripts/benchmark_deepseek.py --layers 4 --dense-layers 1 --batch 1 32 --impls auto xla

Every layer has the released widths (d 7168, 128 MLA heads, 256 routed experts of width 2048 + one
shared, top-8 of 4 groups out of 8; the dense layers' MLP 18432) and random bf16 weights; only the
depth is cut (4 layers with all 256 experts is ~74 GB: what one 80 GB H100 holds). No MTP module.

Floor of one decode step = bytes that must be read / read bandwidth measured in the same run
(`utils.benchmarking.read_bandwidth`; the datasheet figure is printed beside it): every non-expert weight (the
embedding only for its gathered rows), the shared experts, the routed
experts that the step's tokens actually select (counted from the router on the benchmark's own
tokens), and the latent cache up to each row's length.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

# The parameters take ~90% of an H100: let XLA's allocator have most of the card (default 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vishwam_jax import models  # noqa: E402
from vishwam_jax.inference.engine import Generator  # noqa: E402
from vishwam_jax.models import stack  # noqa: E402
from vishwam_jax.pallas_kernels import grouped_matmul, mla_attention  # noqa: E402
from vishwam_jax.presets import get_config, replace  # noqa: E402
from vishwam_jax.utils.benchmarking import read_bandwidth, tree_bytes  # noqa: E402

QUANTIZED_SCALE = 5e-4


def random_params(config, dtype, seed: int = 0, *, per_layer: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and random parameters, built leaf by leaf and, for large leaves, slab by
    slab into a donated buffer, so that no float32 copy of a 7.5 GB expert stack ever exists (a
    seeded build of the module would need one). per_layer: each stacked parameter built directly as
    one buffer per layer (`stack.Layers`, what GPU serving runs), never whole."""
    graphdef, state = nnx.split(models.abstract(config, dtype), nnx.Param)

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
    def fill(buf, key, start, rows):
        # Slabs of rows of the leaf seen as [-1, last dim]: a reshape of the donated buffer, no copy.
        flat = buf.reshape(-1, buf.shape[-1])
        # Quantized values (int8, float8) times QUANTIZED_SCALE: the same 0.02 spread as the float weights.
        spread = 0.02 / QUANTIZED_SCALE if buf.dtype.itemsize == 1 else 0.02
        slab = jnp.clip(jax.random.normal(key, (rows, flat.shape[1]), jnp.float32) * spread, -127, 127).astype(
            buf.dtype
        )
        return jax.lax.dynamic_update_slice_in_dim(flat, slab, start, 0).reshape(buf.shape)

    key = jax.random.key(seed)

    def draw(name: str, shape: tuple[int, ...], dtype):
        nonlocal key
        if name == "scale":  # norm scales: the identity
            return jnp.ones(shape, dtype)
        if name == "kernel_scale":  # quantized weights: one scale for every channel / block
            return jnp.full(shape, QUANTIZED_SCALE, dtype)
        if name == "bias":  # the router's balancing bias
            return jnp.zeros(shape, dtype)
        buf = jnp.zeros(shape, dtype)
        total = int(np.prod(shape[:-1]))
        rows = max(1, min(total, (1 << 26) // shape[-1]))
        for start in range(0, total, rows):
            key, sub = jax.random.split(key)
            # The last slab overlaps the previous one rather than compiling a second shape.
            buf = fill(buf, sub, min(start, total - rows), rows)
        return buf

    def make(path, variable):
        s, name = variable.get_value(), path[-1].key
        if per_layer and (variable.get_metadata().get("out_sharding") or (None,))[0] == "layers":
            return variable.replace(stack.Layers([draw(name, s.shape[1:], s.dtype) for _ in range(s.shape[0])]))
        return variable.replace(draw(name, s.shape, s.dtype))

    return graphdef, jax.tree_util.tree_map_with_path(make, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def kv_bytes_per_token(config, itemsize: int = 2) -> tuple[int, int]:
    """(latent cache, naive per-head K/V) bytes per token over all layers, by arithmetic."""
    ours = config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize
    head_kv = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    return ours, config.num_layers * config.num_heads * head_kv * itemsize


def fit_to_memory(config, dev, headroom: float):
    """The config with MoE layers turned into dense ones (fewer bytes) until the bf16 parameters
    leave `headroom` bytes of the device's allocator limit; said out loud, never silently."""
    stats = dev.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return config
    while True:
        need = tree_bytes(nnx.state(models.abstract(config, jnp.bfloat16), nnx.Param))
        if need + headroom <= limit or config.num_dense_layers >= config.num_layers:
            print(f"allocator limit {limit / 2**30:.1f} GiB; parameters {need / 2**30:.1f} GiB", flush=True)
            return config
        print(
            f"{config.num_dense_layers} dense + {config.num_layers - config.num_dense_layers} MoE layers need "
            f"{need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB: one more layer dense",
            flush=True,
        )
        config = replace(config, num_dense_layers=config.num_dense_layers + 1)


def decode_step_probe(graphdef, params, prompts: np.ndarray, max_len: int):
    """Prefill the prompts into a fresh latent cache, then run one decode step with the router's
    counts: (distinct routed experts per MoE layer that step selects [L], the cache's measured
    bytes per token and layer-stack, i.e. sum of its arrays' sizes / (batch * max_len))."""

    @jax.jit
    def probe(p, tokens):
        model = nnx.merge(graphdef, p)
        cache = model.init_cache(tokens.shape[0], max_len, jnp.bfloat16)
        out = model(tokens, cache=cache, logit_positions=jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1))
        nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        step = model(nxt, cache=out.cache)
        return step.expert_counts, {k: v for k, v in step.cache.items() if k != "pos"}

    counts, layers = probe(params, jnp.asarray(prompts))
    measured = sum(x.nbytes for x in jax.tree_util.tree_leaves(layers)) / (prompts.shape[0] * max_len)
    return (np.asarray(counts) > 0).sum(axis=1), measured


def main(argv=None) -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek-v3-671b", help="widths to use (a small preset for a CPU smoke run)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["auto", "xla"],
        help="kernel settings to time, in order: auto (Pallas MLA decode + Pallas grouped matmul on GPU) "
        "and/or xla (plain einsums + jax.lax.ragged_dot); later ones only while --time-budget lasts",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=170.0,
        help="seconds after which no further routing probe, nor configuration of a later --impls entry, is started",
    )
    ap.add_argument("--headroom-gib", type=float, default=4.5, help="device memory kept free of parameters")
    ap.add_argument("--bandwidth-mib", type=int, default=4096, help="buffer size of the bandwidth measurements")
    ap.add_argument(
        "--layers-form",
        choices=["auto", "scanned", "per-layer"],
        default="auto",
        help="stacked weights scanned, or held as per-layer buffers (auto: per-layer on GPUs, as vj.load)",
    )
    ap.add_argument(
        "--quantize",
        nargs="+",
        choices=["none", "fp8", "fp8-activations", "int8"],
        default=["none"],
        help="weight formats to time in turn: none (bf16), fp8 (e4m3 in 128 x 128 blocks, DeepSeek's release "
        "format, read by the block-scaled kernel; activations bf16), fp8-activations (the same weights, every "
        "product's input in 1 x 128 float8 tiles too: DeepSeek's inference numerics), int8 (per output "
        "channel); random values either way",
    )
    ap.add_argument("--json", help="also write the results here (rewritten after every row)")
    args = ap.parse_args(argv)
    if args.layers < 1 or not 0 <= args.dense_layers <= args.layers:
        ap.error(f"need 0 <= --dense-layers <= --layers and --layers >= 1 (got {args.dense_layers}, {args.layers})")

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    bw = read_bandwidth(args.bandwidth_mib << 20)
    print(f"measured {bw.describe()}", flush=True)

    # eos -1: never stop early, every row decodes every step.
    config = get_config(
        args.preset,
        num_layers=args.layers,
        num_dense_layers=args.dense_layers,
        num_mtp_layers=0,
        max_seq_len=args.prompt_len + args.new_tokens + 16,
        eos_token_id=-1,
    )
    config = fit_to_memory(config, dev, args.headroom_gib * 2**30)
    float_config = config
    moe_layers = config.num_layers - config.num_dense_layers
    result = None
    for quant in args.quantize:
        params = None  # the previous format's buffers go before the next are built
        start = time.perf_counter()
        # Per-layer buffers: what vj.load serves with on GPUs (models/stack.py: XLA copies a scanned layer's slices).
        per_layer = jax.default_backend() == "gpu" if args.layers_form == "auto" else args.layers_form == "per-layer"
        weights, activations = ("fp8", "fp8") if quant == "fp8-activations" else (quant, "none")
        config = replace(float_config, quantization=weights, quantization_activations=activations)
        graphdef, params = random_params(config, jnp.bfloat16, per_layer=per_layer)
        params = jax.block_until_ready(params)
        param_bytes = tree_bytes(params)
        print(
            f"{config.num_layers} layers ({config.num_dense_layers} dense, {moe_layers} MoE with "
            f"{config.num_experts} experts): "
            f"{param_bytes / 1e9:.1f} GB of parameters ({'per-layer buffers' if per_layer else 'stacked, scanned'}), "
            f"built on the device in {time.perf_counter() - start:.0f} s",
            flush=True,
        )

        full = get_config(args.preset)
        ours_kv, mha_kv = kv_bytes_per_token(full)
        bench_kv, bench_mha = kv_bytes_per_token(config)
        print(
            f"KV cache per token (bf16), full {full.num_layers}-layer model: latent {ours_kv:,} B vs naive MHA "
            f"{mha_kv:,} B "
            f"({mha_kv / ours_kv:.1f}x); this {config.num_layers}-layer model: {bench_kv:,} B vs {bench_mha:,} B",
            flush=True,
        )

        stored = nnx.to_pure_dict(params)
        expert_bytes = tree_bytes(stored["moe_layers"]["experts"]) if moe_layers else 0  # every MoE layer's
        per_expert = expert_bytes / max(1, config.num_experts * moe_layers)
        embed_bytes = tree_bytes(stored["embed"])
        result = result or {
            "device": dev.device_kind,
            "jax": jax.__version__,
            "read_bw": bw.bytes_per_s,
            "read_bw_xla": bw.xla_reduction,
            "read_bw_pallas": bw.pallas_stream,
            "spec_bw": bw.spec,
            "param_bytes": {},
            "layers": config.num_layers,
            "dense_layers": config.num_dense_layers,
            "layers_form": "per-layer" if per_layer else "scanned",
            "kv_bytes_per_token": {
                "latent_full": ours_kv,
                "naive_mha_full": mha_kv,
                "latent_bench": bench_kv,
                "naive_mha_bench": bench_mha,
            },
            "rows": [],
        }
        result["param_bytes"][quant] = param_bytes
        probes = {}
        for impl in args.impls:
            for batch in args.batch:
                if impl != args.impls[0] and time.perf_counter() - t0 > args.time_budget:
                    print(
                        f"[{impl}] batch {batch}: skipped (time budget of {args.time_budget:.0f} s spent)", flush=True
                    )
                    continue
                for var in (mla_attention.ENV_VAR, grouped_matmul.ENV_VAR):  # read when a forward is traced
                    os.environ.pop(var, None) if impl == "auto" else os.environ.__setitem__(var, impl)
                rng = np.random.default_rng(batch)
                prompts = rng.integers(3, config.vocab_size, size=(batch, args.prompt_len))
                gen = Generator(graphdef, config)  # a fresh one: compiled under this kernel setting
                try:
                    gen.generate(params, prompts, args.new_tokens)  # compile + warm up
                    compile_s = gen.stats.compile_s
                    gen.generate(params, prompts, args.new_tokens)
                except Exception as err:  # report what ran; one device run must not be lost to one shape
                    print(f"[{impl}] batch {batch}: FAILED {type(err).__name__}: {str(err)[:2000]}", flush=True)
                    continue
                s = gen.stats
                step_s = s.decode_s / args.new_tokens
                print(
                    f"[{quant} {impl}] batch {batch}: decode {batch * args.new_tokens / s.decode_s:,.1f} tok/s "
                    f"({step_s * 1e3:.2f} ms/step), prefill {s.prefill_tokens_per_s:,.0f} tok/s, "
                    f"compile {compile_s:.0f} s",
                    flush=True,
                )
                if batch not in probes and time.perf_counter() - t0 < args.time_budget:
                    probes[batch] = decode_step_probe(graphdef, params, prompts, config.max_seq_len)
                if batch in probes:
                    touched_per_layer, measured_kv = probes[batch]
                    routing = "measured"
                else:  # no time left to compile the probe: the expectation under uniform routing, said so
                    e, k = config.num_experts, config.num_experts_per_token
                    touched_per_layer = np.full(moe_layers, e * (1 - (1 - k / e) ** batch))
                    measured_kv, routing = float("nan"), "expected under uniform routing (probe skipped)"
                touched = float(touched_per_layer.sum())
                context = args.prompt_len + args.new_tokens / 2  # mean cache length over the decode
                cache_read = batch * context * bench_kv
                # Weights a step must read: all but the routed experts and the embedding table, plus
                # the gathered embedding rows, the routed experts its tokens select, and the cache.
                weights = param_bytes - expert_bytes - embed_bytes + batch * config.d_model * 2 + touched * per_expert
                read = weights + cache_read
                floor_s = read / bw.bytes_per_s
                row = {
                    "quantization": quant,
                    "kernels": impl,
                    "batch": batch,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "prefill_tok_s": s.prefill_tokens_per_s,
                    "decode_tok_s": batch * args.new_tokens / s.decode_s,
                    "step_ms": step_s * 1e3,
                    "roofline_step_ms": floor_s * 1e3,
                    "fraction_of_roofline": floor_s / step_s,
                    "fraction_of_spec": read / bw.spec / step_s if bw.spec else None,
                    "experts_touched_per_step_per_moe_layer": touched_per_layer.tolist(),
                    "routing": routing,
                    "weight_bytes_per_step_gb": weights / 1e9,
                    "cache_bytes_per_step_gb": cache_read / 1e9,
                    "measured_cache_bytes_per_token": measured_kv,
                    "compile_s": compile_s,
                }
                result["rows"].append(row)
                print(
                    f"[{quant} {impl}] batch {batch}: prefill {row['prefill_tok_s']:,.0f} tok/s, decode "
                    f"{row['decode_tok_s']:,.1f} tok/s, "
                    f"step {row['step_ms']:.2f} ms vs floor {row['roofline_step_ms']:.2f} ms at read bandwidth "
                    f"({100 * row['fraction_of_roofline']:.0f}%"
                    + (f", {100 * row['fraction_of_spec']:.0f}% of spec" if row["fraction_of_spec"] else "")
                    + f"); routed experts per MoE layer {touched_per_layer.tolist()} ({routing}), "
                    f"{weights / 1e9:.2f} GB weights + {cache_read / 1e6:.1f} MB cache read/step; "
                    f"cache arrays measured {measured_kv:,.0f} B/token (arithmetic {bench_kv:,} B); compile "
                    f"{compile_s:.0f} s",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=2)
        config = float_config
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
