"""Train the embedded demo model (`gemma-shakespeare`, byte-level Gemma) on the Shakespeare corpus.

    python scripts/train_demo.py --steps 3000 --out vishwam_jax/data/gemma-shakespeare

Logs the training loss, keeps Orbax checkpoints (CheckpointManager) in --workdir, reports the
held-out loss (nats per byte) and writes the final weights (bfloat16) as a model directory.
A thin use of the training library (vishwam_jax.training.trainer; scripts/train.py is the general CLI).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

import vishwam_jax as vj  # noqa: E402
from vishwam_jax.training import data  # noqa: E402
from vishwam_jax.training.trainer import TrainConfig, evaluate, train  # noqa: E402

HELDOUT_FRACTION = 0.02


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/vishwam_demo_ckpts")
    ap.add_argument("--out", default=str(vj.DEFAULT_MODEL_DIR))
    args = ap.parse_args(argv)

    tc = TrainConfig(
        model="gemma-shakespeare",
        data="shakespeare",
        heldout_fraction=HELDOUT_FRACTION,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=200,
        seed=args.seed,
        compute_dtype="bfloat16",
        workdir=args.workdir,
        save_every=1000,
        keep=2,
        export=args.out,
        export_dtype="bfloat16",
    )
    start = time.perf_counter()

    def report(step: int, metrics: dict) -> None:
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {metrics['loss']:.4f}  {time.perf_counter() - start:.1f}s", flush=True)

    train(tc, on_step=report, log=lambda line: None)

    model = vj.load(args.out)
    _, heldout = data.train_heldout_split(data.shakespeare_bytes(), HELDOUT_FRACTION)
    n_windows = sum(1 for _ in data.heldout_batches(heldout, 16, args.seq_len)) * 16
    loss = evaluate(model.module, heldout, 16, args.seq_len, jnp.bfloat16)
    print(f"held-out loss {loss:.4f} nats/byte ({loss / np.log(2):.3f} bits/byte) over {n_windows} windows")

    prompt = model.tokenizer.encode("ROMEO.\n")
    out = model.generate([prompt], 300, temperature=0.8, top_k=40, seed=1)
    print("sample:\n" + model.tokenizer.decode(prompt + list(np.asarray(out[0]))))


if __name__ == "__main__":
    main()
