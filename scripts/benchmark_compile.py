"""Trace + compile time of one decode step against model depth (layers are scanned, so it should
barely grow), on whatever device JAX has.

    python scripts/benchmark_compile.py --depth deepseek-v3-tiny:4,61 grok-1-tiny:4,64   # first generate, CPU
    python scripts/benchmark_compile.py --full deepseek-v3-671b grok-1                   # abstract full-size weights

--depth builds each preset at each depth (get_config(name, num_layers=N)) in a fresh subprocess and times
its first `generate` (compilation included), so one run's caches never help the next. --full lowers and
compiles one decode step of the full-size model on abstract weights (jax.eval_shape: no memory is
allocated for parameters) and reports trace and compile seconds separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

FIRST_GENERATE = """
import time, numpy as np, vishwam_jax as vj
config = vj.get_config({name!r}, num_layers={layers}{extra})
model = vj.load(config, dtype="bfloat16")
start = time.perf_counter()
model.generate([[5, 6, 7, 8]], 4)
print(time.perf_counter() - start)
"""


def first_generate_s(name: str, layers: int) -> float:
    # DeepSeek keeps its dense prefix at one layer whatever the depth, as the 4-layer benchmarks do.
    extra = ", num_dense_layers=1" if name.startswith("deepseek") else ""
    code = FIRST_GENERATE.format(name=name, layers=layers, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def decode_step_compile(name: str, batch: int = 1, cache_len: int = 4096) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import vishwam_jax as vj
    from vishwam_jax import models

    config = vj.get_config(name, max_seq_len=cache_len)
    graphdef, params = nnx.split(models.abstract(config, jnp.bfloat16), nnx.Param)
    cache = jax.eval_shape(lambda: models.apply(graphdef, params, batch, cache_len, jnp.bfloat16, method="init_cache"))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def step(params, tokens, cache):
        out = models.apply(graphdef, params, tokens, cache=cache)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(2,)).lower(params, tokens, cache)
    traced = time.perf_counter() - start
    lowered.compile()
    compiled = time.perf_counter() - start - traced
    return {
        "model": name,
        "layers": config.num_layers,
        "trace_s": traced,
        "compile_s": compiled,
        "total_s": traced + compiled,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", nargs="*", default=[], metavar="PRESET:N1,N2", help="first-generate time per depth")
    ap.add_argument(
        "--full", nargs="*", default=[], metavar="PRESET", help="decode-step trace + compile, abstract weights"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import jax

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for spec in args.depth:
        name, depths = spec.split(":")
        times = {int(n): first_generate_s(name, int(n)) for n in depths.split(",")}
        shallow = min(times)
        for n, t in times.items():
            rows.append({"model": name, "layers": n, "first_generate_s": t, "ratio_to_shallowest": t / times[shallow]})
            print(
                f"{name} {n} layers: first generate {t:.2f} s ({t / times[shallow]:.2f}x the {shallow}-layer model)",
                flush=True,
            )
    for name in args.full:
        row = decode_step_compile(name)
        rows.append(row)
        print(
            f"{name} ({row['layers']} layers) decode step: trace {row['trace_s']:.2f} s + compile "
            f"{row['compile_s']:.2f} s "
            f"= {row['total_s']:.2f} s",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
