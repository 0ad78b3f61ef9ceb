"""Where one batch-1 decode step of DeepSeek-V3 (full width, a few layers) spends its device time, per
weight format: the kernels of one step, summed from a profiler trace (vishwam_jax/utils/profiling).

    python scripts/profile_deepseek_decode.py --layers 4 --quantize fp8 none
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_deepseek import random_params  # noqa: E402

from vishwam_jax.presets import get_config, replace  # noqa: E402
from vishwam_jax.utils.profiling import profile_device_ops  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="deepseek-v3-671b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--quantize", nargs="+", choices=["none", "fp8", "int8"], default=["fp8", "none"])
    ap.add_argument("--top", type=int, default=22, help="kernels to list per format")
    args = ap.parse_args()
    max_len = args.prompt_len + 128
    base = get_config(
        args.preset, num_layers=args.layers, num_dense_layers=args.dense_layers, num_mtp_layers=0,
        max_seq_len=max_len, eos_token_id=-1,
    )  # fmt: skip
    for quant in args.quantize:
        config = replace(base, quantization=quant)
        graphdef, params = random_params(config, jnp.bfloat16, per_layer=jax.default_backend() == "gpu")
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (1, args.prompt_len)))

        @jax.jit
        def prefill(p, t):
            model = nnx.merge(graphdef, p)
            out = model(t, cache=model.init_cache(1, max_len, jnp.bfloat16), logit_positions=jnp.full((1, 1), -1))
            return out.cache

        @jax.jit
        def step(p, cache, t):
            return nnx.merge(graphdef, p)(t, cache=cache).logits

        cache = prefill(params, tokens)
        nxt = jnp.zeros((1, 1), jnp.int32)
        summary = profile_device_ops(lambda p=params, c=cache: step(p, c, nxt), calls=5)
        print(f"== {quant}: {summary['busy_us_per_call']:.0f} µs of kernels per step ({summary['device']})")
        for op in summary["ops"][: args.top]:
            print(f"  {op['us_per_call']:8.1f} µs  ×{op['count_per_call']:4.1f}  {op['name'][:110]}", flush=True)
        params = cache = None  # the next format's buffers go in their place
    return 0


if __name__ == "__main__":
    sys.exit(main())
