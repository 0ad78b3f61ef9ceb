"""Decode tokens/s of a full-width Grok-1 at reduced depth, bf16 and weight-only int8, against the
read-bandwidth floor.

    python scripts/benchmark_grok.py --layers 2 --batch 1 8 --weights bf16 int8

Every layer has the released width (d 6144, 48/8 heads, 8 experts of 32768, top-2) and the released
vocabulary; only the depth is cut (314B parameters do not fit one accelerator). Weights are random.
The roofline of one decode step is the bytes that step must read - the tied embedding (the logits),
each layer's attention weights, router and the experts its tokens select, the filled KV cache - over
the read bandwidth measured in the same run (`utils.benchmarking.read_bandwidth`). With random routing a batch
of B tokens selects on
average E * (1 - (1 - k/E)^B) distinct experts per layer (2 at B = 1, 7.2 of 8 at B = 8).
EOS is disabled so that every row decodes every step.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vishwam_jax as vj
from vishwam_jax import models
from vishwam_jax.models import stack
from vishwam_jax.pallas_kernels import grouped_matmul
from vishwam_jax.presets import get_config, replace
from vishwam_jax.utils.benchmarking import read_bandwidth, tree_bytes


def _draw(key, shape, dtype, std):
    if dtype == jnp.int8:  # int8 ~ U(-127, 127)
        return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


# One layer of a stacked leaf at a time, into a donated buffer: the float32 draw covers one layer
# (no float32 copy of a whole [L, 8, 6144, 32768] expert stack).
_fill_layer = jax.jit(
    lambda buf, i, key, std: buf.at[i].set(_draw(key, buf.shape[1:], buf.dtype, std)), donate_argnums=0
)
_draw_jit = jax.jit(_draw, static_argnums=(1, 2))


def _fan_in(path: tuple, kernel_shape: tuple[int, ...]) -> int:
    """Input width of a weight (stacked leaves have the layer axis first)."""
    if path[0] == "embed":
        return kernel_shape[-1]
    if path[-2] == "o":  # [L, h, hd, d]
        return kernel_shape[1] * kernel_shape[2]
    if "experts" in path:  # [L, e, in, out]
        return kernel_shape[2]
    return kernel_shape[1]  # [L, d, ...]


def random_model(config, seed: int = 0) -> nnx.Module:
    """The Grok-1 module with random bf16 weights generated on the device leaf by leaf (no host copy
    of ~20 GB). With config.quantization == "int8" every attention and expert matrix is int8 with
    per-output-channel scales, as `convert(quantize="int8")` writes them; embedding, norms and router
    stay floating (as in the release)."""
    graphdef, state = nnx.split(models.abstract(config, jnp.bfloat16), nnx.Param)
    shapes = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(seed), 4096))

    def make(keypath, s):
        path = tuple(k.key for k in keypath)
        if path[-2].endswith("norm"):
            return jnp.ones(s.shape, s.dtype)
        node = shapes
        for k in path[:-1]:
            node = node[k]
        fan_in = _fan_in(path, node["kernel"].shape if "kernel" in node else s.shape)
        if path[-1] == "scale":  # of an int8 kernel: U(-127, 127) * scale has std 1/sqrt(fan_in)
            return jnp.full(s.shape, 1.0 / (64 * math.sqrt(fan_in)), s.dtype)
        std = 1.0 / math.sqrt(fan_in)
        if path[0] != "layers":
            return _draw_jit(next(keys), s.shape, s.dtype, std)
        buf = jnp.zeros(s.shape, s.dtype)
        for i in range(s.shape[0]):
            buf = _fill_layer(buf, i, next(keys), std)
        return buf

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(make, shapes))
    return nnx.merge(graphdef, state)


def step_bytes(config, params, batch: int, cache_len: float) -> float:
    """Bytes one decode step must read (see the module docstring)."""
    p = nnx.to_pure_dict(params)
    e, k = config.num_experts, config.num_experts_per_token
    distinct = e * (1 - (1 - k / e) ** batch)
    experts = tree_bytes(p["layers"]["experts"])  # every layer's
    layers = tree_bytes(p["layers"]) - experts + experts * distinct / e
    kv = 2 * batch * cache_len * config.num_kv_heads * config.head_dim * 2  # k and v, bf16
    return tree_bytes(p["embed"]) + tree_bytes(p["final_norm"]) + layers + config.num_layers * kv


def decode_temp_bytes(model) -> int:
    """Scratch memory of the compiled decode loop (read from the engine's executables, so nothing is
    compiled twice): with int8 weights it must stay far below a bf16 copy of them, the matmuls
    converting tiles on the fly."""
    decode = [exe for (fn, *_), exe in model._generator._executables.items() if fn is model._generator._decode_jit]
    return max(int(exe.memory_analysis().temp_size_in_bytes) for exe in decode)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="grok-1", help="widths to use (a small preset for a CPU smoke run)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--weights", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--scan-unroll", type=int, default=1, help="layers per scan iteration (at least --layers: straight-line code)"
    )
    ap.add_argument(
        "--layers-form",
        choices=["auto", "scanned", "per-layer"],
        default="auto",
        help="stacked weights scanned, or one buffer per layer as vj.load serves on GPUs (auto: per-layer on GPUs)",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    per_layer = jax.default_backend() == "gpu" if args.layers_form == "auto" else args.layers_form == "per-layer"

    gmm_impl = grouped_matmul.resolve_implementation()
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, grouped matmul: {gmm_impl}, "
        f"layers: {'per-layer buffers' if per_layer else 'stacked, scanned'}",
        flush=True,
    )
    bw = read_bandwidth()
    print(f"measured {bw.describe()}", flush=True)
    # eos -1: never sampled, so every row decodes every step.
    config = get_config(args.preset, num_layers=args.layers, eos_token_id=-1, scan_unroll=args.scan_unroll)
    loaded, read_bytes = {}, {}
    for weights in args.weights:  # both held at once (~33 GB at 2 layers): rows alternate bf16/int8
        module = random_model(replace(config, quantization="int8" if weights == "int8" else "none"))
        graphdef, stacked = nnx.split(module, nnx.Param)
        read_bytes[weights] = {
            b: step_bytes(config, stacked, b, args.prompt_len + args.new_tokens / 2) for b in args.batch
        }
        if per_layer:  # what vj.load serves with on GPUs (models/stack.py: XLA copies a scanned layer's slices)
            module = nnx.merge(graphdef, stack.unstack_layers(stacked, delete_stacked=True))
        model = vj.Model(module)
        loaded[weights] = model
        int8_bytes = sum(x.size for x in jax.tree_util.tree_leaves(model.params) if x.dtype == jnp.int8)
        print(
            f"{weights}: {tree_bytes(model.params) / 1e9:.2f} GB of parameters ({int8_bytes / 1e9:.2f} GB of "
            "them int8)",
            flush=True,
        )
    rows = []
    for batch in args.batch:
        prompts = np.random.default_rng(0).integers(3, config.vocab_size, size=(batch, args.prompt_len))
        for weights, model in loaded.items():
            params = model.params
            model.generate(prompts, args.new_tokens)  # compile + warm up
            compile_s = model.last_generation_stats.compile_s
            runs = []
            for _ in range(3):  # the fastest of three timed generations
                model.generate(prompts, args.new_tokens)
                runs.append(model.last_generation_stats)
            s = min(runs, key=lambda r: r.decode_s)
            temp = decode_temp_bytes(model)
            step_s = s.decode_s / args.new_tokens
            floor_s = read_bytes[weights][batch] / bw.bytes_per_s
            row = {
                "weights": weights,
                "layers": args.layers,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "decode_tok_s": batch / step_s,
                "step_ms": step_s * 1e3,
                "roofline_step_ms": floor_s * 1e3,
                "fraction_of_roofline": floor_s / step_s,
                "prefill_tok_s": s.prefill_tokens_per_s,
                "compile_s": compile_s,
                "param_bytes": tree_bytes(params),
                "step_bytes": read_bytes[weights][batch],
                "decode_temp_bytes": temp,
                "layers_form": "per-layer" if per_layer else "scanned",
            }
            rows.append(row)
            if args.json:  # after every row, so a run stopped early still leaves its numbers
                with open(args.json, "w") as f:
                    json.dump(
                        {
                            "device": jax.devices()[0].device_kind,
                            "jax": jax.__version__,
                            "gmm": gmm_impl,
                            "read_bw": bw.bytes_per_s,
                            "spec_bw": bw.spec,
                            "rows": rows,
                        },
                        f,
                        indent=2,
                    )
            print(
                f"{weights} batch {batch}: decode {row['decode_tok_s']:,.1f} tok/s, step {row['step_ms']:.2f} ms vs "
                f"roofline {row['roofline_step_ms']:.2f} ms ({100 * row['fraction_of_roofline']:.0f}%; "
                f"{row['step_bytes'] / 1e9:.2f} GB "
                f"read per step), prefill {row['prefill_tok_s']:,.0f} tok/s, decode scratch {temp / 1e9:.3f} GB, "
                f"compile {compile_s:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
