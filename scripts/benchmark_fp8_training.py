"""FP8 training against bf16 on the same data: loss curves, final loss ratio, step time (issue 14's
FP8-training item: the final loss within 1 % of bf16's).

    python scripts/benchmark_fp8_training.py --models deepseek-v3-tiny gemma-shakespeare --steps 300

Each model trains twice from the same initialization on the same batches of the bundled Shakespeare
corpus (bytes): bf16 compute with float32 master weights, then the same with `--fp8` GEMMs
(vishwam_jax/quantization/fp8_training.py). Printed: the loss every --every steps for both, the final
loss and the mean of the last 20 steps, their ratios, and the mean step time after compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
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
    args = ap.parse_args()
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
            f"(FP8 numerics in float32 products: not a speed measurement of FP8 GEMMs)"
        )
        results[model] = {"bf16": bf16, "fp8": fp8, "final_ratio": final, "last20_ratio": float(tail)}
    if args.json:
        Path(args.json).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
