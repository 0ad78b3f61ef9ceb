"""Per-row sampling cost by what the rows ask for (inference/sampling.sample_rows): greedy, temperature
alone, top-k alone (a selection), top-p (a sort of the vocabulary). Runs wherever JAX runs.

    python scripts/benchmark_sampling.py --batch 64 --vocab 256000
"""

import argparse
import time

import jax
import jax.numpy as jnp

from vishwam_jax.inference import sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    b, v = args.batch, args.vocab
    logits = jax.random.normal(jax.random.key(0), (b, v))
    seeds, counters = jnp.arange(b, dtype=jnp.uint32), jnp.zeros((b,), jnp.int32)
    f = jax.jit(sampling.sample_rows)
    off_k, off_p = jnp.zeros((b,), jnp.int32), jnp.ones((b,))
    rows = {
        "greedy": (jnp.zeros((b,)), off_k, off_p),
        "temperature 0.8": (jnp.full((b,), 0.8), off_k, off_p),
        "temperature 0.8, top_k 50": (jnp.full((b,), 0.8), jnp.full((b,), 50, jnp.int32), off_p),
        "temperature 0.8, top_p 0.9": (jnp.full((b,), 0.8), off_k, jnp.full((b,), 0.9)),
    }
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {b}, vocabulary {v}")
    for name, (temperature, top_k, top_p) in rows.items():
        f(logits, seeds, counters, temperature, top_k, top_p).block_until_ready()
        start = time.perf_counter()
        for _ in range(args.calls):
            f(logits, seeds, counters, temperature, top_k, top_p).block_until_ready()
        print(f"{name}: {(time.perf_counter() - start) / args.calls * 1e3:.1f} ms per call")


if __name__ == "__main__":
    main()
