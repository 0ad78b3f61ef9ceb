"""FP8 training against bf16 on the same data: loss curves, final loss ratio, step time (issue 14's
FP8-training item: the final loss within 1 % of bf16's, and the step-time gain).

    python scripts/benchmark_fp8_training.py --models deepseek-v3-tiny gemma-shakespeare --steps 300
    python scripts/benchmark_fp8_training.py --time deepseek-v3-671b --set num_layers=4 num_dense_layers=1 \
        num_experts=16 num_expert_groups=1 num_groups_per_token=1 --batch-size 1 --seq-len 4096 --remat full

`--time MODEL` times the compiled train step (bf16 compute, float32 master weights and AdamW, chunked
loss) of one config without and with FP8 GEMMs, same random init and batch: the mean of
`--time-steps` steps after one compiling step, and their ratio. On a GPU the FP8 forward and dgrad
products run on FP8 tensor cores (`grouped_matmul.gmm_fp8`), once per `--fp8-kernels` entry: "triton"
(the block-scaled Triton kernel) and "mosaic" (the Pallas Mosaic GPU kernel where it takes the shape,
`VISHWAM_GMM_IMPL=mosaic_gpu`).

Each model trains twice from the same initialization on the same batches of the bundled Shakespeare
corpus (bytes): bf16 compute with float32 master weights, then the same with `--fp8` GEMMs
(vishwam_jax/quantization/fp8_training.py). Printed: the loss every --every steps for both, the final
loss and the mean of the last 20 steps, their ratios, and the mean step time after compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout

from vishwam_jax.training.trainer import TrainConfig, train  # noqa: E402

TARGET = 0.01  # |fp8 final loss / bf16 final loss - 1|, at most


def run(model: str, fp8: bool, args) -> dict:
    tc = TrainConfig(
        model=model,
        data="shakespeare",
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        compute_dtype="bfloat16",
        fp8=fp8,
        log_every=args.steps,
    )
    stamps: list[float] = []
    metrics = train(tc, on_step=lambda step, m: stamps.append(time.perf_counter()), log=lambda line: None)
    losses = [float(m["loss"]) for m in metrics]
    return {"losses": losses, "step_s": float(np.mean(np.diff(stamps[1:]))) if len(stamps) > 2 else float("nan")}


@contextlib.contextmanager
def gmm_implementation(name: str | None):
    """$VISHWAM_GMM_IMPL while a step traces (None: as it was)."""
    from vishwam_jax.pallas_kernels import grouped_matmul

    before = os.environ.get(grouped_matmul.ENV_VAR)
    if name is not None:
        os.environ[grouped_matmul.ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(grouped_matmul.ENV_VAR, None)
        else:
            os.environ[grouped_matmul.ENV_VAR] = before


FP8_KERNELS = {"triton": None, "mosaic": "mosaic_gpu"}  # --fp8-kernels: $VISHWAM_GMM_IMPL for each


def time_steps(args) -> dict:
    """Mean step time, bf16 against fp8, of `args.time` with `args.set` overrides (same init, batch)."""
    from flax import nnx

    from vishwam_jax import models
    from vishwam_jax.presets import get_config
    from vishwam_jax.training.optimizer import make_optimizer
    from vishwam_jax.training.step import StepConfig, init_state, make_train_step

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = get_config(args.time, remat_policy=args.remat, **overrides)
    abstract = nnx.eval_shape(lambda: models.build(config, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(1e-4, 1000, warmup_steps=0)
    batch = jax.random.randint(jax.random.key(1), (1, args.batch_size, args.seq_len + 1), 3, config.vocab_size)
    out = {"model": args.time, "overrides": args.set, "batch": args.batch_size, "seq_len": args.seq_len}
    kernels = args.fp8_kernels if jax.default_backend() == "gpu" else ["triton"]  # one FP8 path off GPUs
    variants = [("bf16", False, None)] + [
        ("fp8" if kernel == "triton" else f"fp8 {kernel}", True, FP8_KERNELS[kernel]) for kernel in kernels
    ]
    for name, fp8, implementation in variants:
        # Fresh float32 parameters each time: the step donates its state.
        state = init_state(nnx.state(models.build(config, rngs=nnx.Rngs(0)), nnx.Param), optimizer)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
        step = make_train_step(abstract, optimizer, StepConfig(compute_dtype=jnp.bfloat16, fp8=fp8))
        t0 = time.perf_counter()
        with gmm_implementation(implementation):  # read when the step traces
            state, metrics = step(state, None, batch)
        loss = float(metrics["loss"])
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.time_steps):
            state, metrics = step(state, None, batch)
        jax.block_until_ready(metrics["loss"])
        step_s = (time.perf_counter() - t0) / args.time_steps
        out[name] = {"step_s": step_s, "compile_s": compile_s, "first_loss": loss, "params": n_params}
        print(
            f"{name}: {step_s * 1e3:.1f} ms/step ({args.batch_size * args.seq_len / step_s:,.0f} tok/s), first loss "
            f"{loss:.4f}, compile {compile_s:.0f} s, {n_params / 1e9:.2f} B parameters",
            flush=True,
        )
        del state, metrics, step
    for name, _, _ in variants[1:]:  # "speedup" is the Triton kernel's, as in earlier runs' JSON
        key = "speedup" if name == "fp8" else f"{name} speedup"
        out[key] = out["bf16"]["step_s"] / out[name]["step_s"]
        print(f"{name} step speedup over bf16: {out[key]:.3f} (target 1.3)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deepseek-v3-tiny", "gemma-shakespeare"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=50, help="print the loss every this many steps")
    ap.add_argument("--json", help="also write the curves and ratios here")
    ap.add_argument("--time", metavar="MODEL", help="instead: time the train step of this preset, bf16 then fp8")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="--time: config overrides (JSON)")
    ap.add_argument("--remat", default="full", help="--time: the remat policy")
    ap.add_argument("--time-steps", type=int, default=5, help="--time: steps timed after the compiling one")
    ap.add_argument(
        "--fp8-kernels", nargs="+", choices=sorted(FP8_KERNELS), default=["triton", "mosaic"],
        help="--time on a GPU: the FP8 GEMM kernels to time, each a step of its own",
    )  # fmt: skip
    args = ap.parse_args()
    if args.time:
        result = time_steps(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result))
        return
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.steps} steps, batch {args.batch_size} x "
        f"{args.seq_len}, lr {args.lr} (warmup {args.warmup_steps}), bf16 compute, float32 master weights"
    )
    results = {}
    for model in args.models:
        bf16, fp8 = run(model, False, args), run(model, True, args)
        steps = list(range(0, args.steps, args.every)) + [args.steps - 1]
        print(f"\n{model}")
        print("step  " + "  ".join(f"{s:>7d}" for s in steps))
        for name, r in (("bf16", bf16), ("fp8", fp8)):
            print(f"{name:<5} " + "  ".join(f"{r['losses'][s]:7.4f}" for s in steps))
        final = fp8["losses"][-1] / bf16["losses"][-1]
        tail = np.mean(fp8["losses"][-20:]) / np.mean(bf16["losses"][-20:])
        verdict = "meets" if abs(final - 1) <= TARGET else "misses"
        print(f"final loss fp8 / bf16 = {final:.4f} ({verdict} within {TARGET:.0%}); last 20 steps {tail:.4f}")
        print(
            f"step time bf16 {bf16['step_s'] * 1e3:.1f} ms, fp8 {fp8['step_s'] * 1e3:.1f} ms "
            f"(on a CPU the FP8 products run in float32: not a speed measurement of FP8 GEMMs)"
        )
        results[model] = {"bf16": bf16, "fp8": fp8, "final_ratio": final, "last20_ratio": float(tail)}
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
