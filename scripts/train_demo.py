"""Train the embedded demo model (`gemma-shakespeare`, byte-level Gemma) on the Shakespeare corpus.

    python scripts/train_demo.py --steps 3000 --out vishwam_jax/data/gemma-shakespeare

Logs the training loss, keeps Orbax checkpoints (CheckpointManager) in --workdir, reports the
held-out loss (nats per byte) and writes the final weights (bfloat16) as a model directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import vishwam_jax as vj
from vishwam_jax.checkpoint.orbax_io import save_params
from vishwam_jax.models import family_module
from vishwam_jax.training import data
from vishwam_jax.training.step import make_optimizer, make_train_step, next_token_loss


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

    config = vj.get_config("gemma-shakespeare")
    family = family_module(config)
    corpus = data.shakespeare_bytes()
    train, heldout = data.train_heldout_split(corpus)
    params = family.init_params(config, jax.random.key(args.seed), jnp.float32)
    optimizer = make_optimizer(args.lr, args.steps, warmup_steps=200)
    opt_state = optimizer.init(params)
    train_step = make_train_step(family, config, optimizer, compute_dtype=jnp.bfloat16)

    manager = ocp.CheckpointManager(
        Path(args.workdir).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1000)
    )
    start = time.perf_counter()
    for step in range(args.steps):
        batch = jnp.asarray(data.batch_at(train, step, args.batch_size, args.seq_len, args.seed))
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {float(loss):.4f}  {time.perf_counter() - start:.1f}s", flush=True)
        manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()

    eval_loss = jax.jit(lambda p, b: next_token_loss(family, config, p, b, jnp.bfloat16))
    losses = [float(eval_loss(params, jnp.asarray(b))) for b in data.heldout_batches(heldout, 16, args.seq_len)]
    print(f"held-out loss {np.mean(losses):.4f} nats/byte ({np.mean(losses) / np.log(2):.3f} bits/byte) over {len(losses) * 16} windows")

    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    save_params(args.out, bf16, config, overwrite=True)
    model = vj.load(args.out)
    prompt = model.tokenizer.encode("ROMEO.\n")
    out = model.generate([prompt], 300, temperature=0.8, top_k=40, seed=1)
    print("sample:\n" + model.tokenizer.decode(prompt + list(np.asarray(out[0]))))


if __name__ == "__main__":
    main()
