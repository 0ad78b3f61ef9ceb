"""Decode tokens/s of a full-width Grok-1 at reduced depth, bf16 and weight-only int8, against the
bandwidth roofline.

    python scripts/benchmark_grok.py --layers 2 --batch 1 8 --weights bf16 int8

Every layer has the released width (d 6144, 48/8 heads, 8 experts of 32768, top-2) and the released
vocabulary; only the depth is cut (314B parameters do not fit one accelerator). Weights are random.
The roofline of one decode step is the bytes that step must read - the tied embedding (the logits),
each layer's attention weights, router and the experts its tokens select, the filled KV cache - over
the copy bandwidth measured in the same run. With random routing a batch of B tokens selects on
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

import vishwam_jax as vj
from vishwam_jax.models import grok1
from vishwam_jax.pallas_kernels import grouped_matmul
from vishwam_jax.presets import get_config
from vishwam_jax.utils.benchmarking import copy_bandwidth, tree_bytes

MATMUL_WEIGHTS = {"q", "k", "v", "o", "gate", "up", "down"}


def random_params(config, weights: str, seed: int = 0) -> dict:
    """Random weights generated on the device leaf by leaf (no host copy of ~20 GB). int8: every
    attention and expert matrix int8 with per-output-channel scales, as `convert(keep_int8=True)`
    writes them; embedding, norms and router stay floating (as in the release)."""
    shapes = jax.eval_shape(lambda k: grok1.init_params(config, k, jnp.bfloat16), jax.random.key(0))
    normal = jax.jit(lambda key, std, shape: (jax.random.normal(key, shape, jnp.float32) * std).astype(jnp.bfloat16), static_argnums=2)
    ints = jax.jit(lambda key, shape: jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8), static_argnums=1)
    keys = iter(jax.random.split(jax.random.key(seed), 4096))

    def make(path, s):
        name = path[-1].key
        if name.endswith("norm"):
            return jnp.ones(s.shape, s.dtype)
        fan_in = s.shape[0] * s.shape[1] if name == "o" else s.shape[-1] if name == "embed" else s.shape[-2] if s.ndim == 3 else s.shape[0]
        if weights == "int8" and name in MATMUL_WEIGHTS:
            contracted = (0, 1) if name == "o" else (1,) if name in ("gate", "up", "down") else (0,)
            scale_shape = tuple(1 if a in contracted else n for a, n in enumerate(s.shape))
            scale = jnp.full(scale_shape, 1.0 / (64 * math.sqrt(fan_in)), jnp.float32)  # int8 ~ U(-127,127)
            return {"int8": ints(next(keys), s.shape), "scale": scale}
        return normal(next(keys), 1.0 / math.sqrt(fan_in), s.shape).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def step_bytes(config, params, batch: int, cache_len: float) -> float:
    """Bytes one decode step must read (see the module docstring)."""
    layer = params["layers"][0]
    e, k = config.num_experts, config.num_selected_experts
    distinct = e * (1 - (1 - k / e) ** batch)
    per_layer = tree_bytes(layer) - tree_bytes(layer["moe"]) + tree_bytes(layer["moe"]) * distinct / e
    kv = 2 * batch * cache_len * config.num_kv_heads * config.key_size * 2  # k and v, bf16
    return tree_bytes(params["embed"]) + tree_bytes(params["final_norm"]) + config.num_layers * (per_layer + kv)


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
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    gmm_impl = grouped_matmul.resolve_implementation()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, grouped matmul: {gmm_impl}", flush=True)
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    config = get_config(args.preset)
    config.num_layers = args.layers
    config.eos_token_id = -1  # never sampled: every row decodes every step
    models = {}
    for weights in args.weights:  # both held at once (~33 GB at 2 layers): rows alternate bf16/int8
        params = random_params(config, weights)
        models[weights] = vj.Model(config, params)
        int8_bytes = sum(x.size for x in jax.tree_util.tree_leaves(params) if x.dtype == jnp.int8)
        print(f"{weights}: {tree_bytes(params) / 1e9:.2f} GB of parameters ({int8_bytes / 1e9:.2f} GB of them int8)", flush=True)
    rows = []
    for batch in args.batch:
        prompts = np.random.default_rng(0).integers(3, config.vocab_size, size=(batch, args.prompt_len))
        for weights, model in models.items():
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
            floor_s = step_bytes(config, params, batch, args.prompt_len + args.new_tokens / 2) / bw
            row = {
                "weights": weights, "layers": args.layers, "batch": batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens, "decode_tok_s": batch / step_s, "step_ms": step_s * 1e3,
                "roofline_step_ms": floor_s * 1e3, "fraction_of_roofline": floor_s / step_s,
                "prefill_tok_s": s.prefill_tokens_per_s, "compile_s": compile_s, "param_bytes": tree_bytes(params),
                "step_bytes": step_bytes(config, params, batch, args.prompt_len + args.new_tokens / 2), "decode_temp_bytes": temp,
            }
            rows.append(row)
            if args.json:  # after every row, so a run stopped early still leaves its numbers
                with open(args.json, "w") as f:
                    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "gmm": gmm_impl, "copy_bw": bw, "rows": rows}, f, indent=2)
            print(f"{weights} batch {batch}: decode {row['decode_tok_s']:,.1f} tok/s, step {row['step_ms']:.2f} ms vs "
                  f"roofline {row['roofline_step_ms']:.2f} ms ({100 * row['fraction_of_roofline']:.0f}%; {row['step_bytes'] / 1e9:.2f} GB "
                  f"read per step), prefill {row['prefill_tok_s']:,.0f} tok/s, decode scratch {temp / 1e9:.3f} GB, "
                  f"compile {compile_s:.0f} s", flush=True)

if __name__ == "__main__":
    main()
