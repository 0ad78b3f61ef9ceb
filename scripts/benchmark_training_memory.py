"""Compiled memory of one training step, for any preset, without its weights or an accelerator:
XLA's own accounting of the step (arguments, outputs, temporaries) for the backend it runs on.

    python scripts/benchmark_training_memory.py --model gemma-2b --batch-size 4 --seq-len 1024 \
        --remat full --loss-chunk 0 256

One row per --loss-chunk (0: the float32 logits of the whole batch at once). Plans a run before a
GPU is rented, and shows what the chunked cross-entropy saves (issue 15's training item).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from vishwam_jax import models
from vishwam_jax.presets import get_config
from vishwam_jax.training.optimizer import make_optimizer
from vishwam_jax.training.step import StepConfig, init_state, make_train_step


def step_memory(args, loss_chunk: int) -> dict:
    config = get_config(args.model, remat_policy=args.remat)
    module = models.abstract(config)
    optimizer = make_optimizer(1e-4, 10)
    step = make_train_step(
        module, optimizer, StepConfig(compute_dtype=jnp.bfloat16, loss_chunk=loss_chunk or None, mtp_weight=0.0)
    )
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(module, nnx.Param))
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    batch = jax.ShapeDtypeStruct((1, args.batch_size, args.seq_len + 1), jnp.int32)
    start = time.perf_counter()
    memory = step.lower(state, None, batch).compile().memory_analysis()
    return {
        "loss_chunk": loss_chunk,
        "arguments_bytes": memory.argument_size_in_bytes,
        "temporaries_bytes": memory.temp_size_in_bytes,
        "compile_s": time.perf_counter() - start,
    }


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e9:.6f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-2b")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[0, 256])
    args = ap.parse_args()
    config = get_config(args.model)
    logits_bytes = args.batch_size * args.seq_len * config.vocab_size * 4
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.model}, batch {args.batch_size} x "
        f"{args.seq_len}, remat {args.remat}, bf16 compute, float32 weights and AdamW state"
    )
    print(f"float32 logits of the batch: {gigabytes(logits_bytes)}")
    for chunk in args.loss_chunk:
        r = step_memory(args, chunk)
        print(
            f"loss chunk {chunk or 'whole':>6}: arguments {gigabytes(r['arguments_bytes'])}, "
            f"temporaries {gigabytes(r['temporaries_bytes'])} (compiled in {r['compile_s']:.0f} s)"
        )


if __name__ == "__main__":
    main()
