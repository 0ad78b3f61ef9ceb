"""Train or fine-tune any vishwam_jax model (Gemma, DeepSeek-V3, Grok-1).

    # from scratch, a preset, on the Shakespeare demo corpus (bytes)
    python scripts/train.py --model gemma-tiny --steps 200 --batch-size 16 --seq-len 128 --workdir /tmp/run
    # run the same command again: it resumes from the latest checkpoint in --workdir
    # tokenized data (flat uint16/uint32 binary or .npy, memory-mapped), FSDP x tensor on 8 devices
    python scripts/train.py --model deepseek-v3-tiny --data tokens.bin --data-dtype uint32 --mesh fsdp=4,tensor=2
    # LoRA fine-tuning of a converted checkpoint, merged export as a normal model directory
    python scripts/train.py --model ~/models/gemma2-2b --lora-rank 16 --lora-targets q,v,o --export ~/models/g2-ft

Multi-host: run the same command on every host (scripts/launch_tpu_pod.sh, scripts/launch_gpu_multinode.sh);
jax.distributed starts from --coordinator/--num-processes/--process-id, the JAX_* environment, or
the cluster's own variables (TPU pods, SLURM). Each host reads only its own rows of every batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from vishwam_jax.models.remat import POLICY_NAMES  # noqa: E402
from vishwam_jax.training import lora as lora_lib  # noqa: E402
from vishwam_jax.training.trainer import DTYPES, RESUME_MODES, TrainConfig  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model and data")
    m.add_argument("--model", default=d.model, help="preset name (random init) or converted model directory")
    m.add_argument("--data", default=d.data, help="'shakespeare', a .npy of token ids, or a flat binary token file")
    m.add_argument(
        "--data-dtype", default=d.data_dtype, help="element type of a flat binary token file (uint16, uint32)"
    )
    m.add_argument("--seed", type=int, default=d.seed, help="initialization and data order")
    m.add_argument(
        "--heldout-fraction",
        type=float,
        default=d.heldout_fraction,
        help="hold out this tail of the data (never trained on)",
    )
    m.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="> 0: held-out loss every N steps and at the end"
    )
    m.add_argument("--eval-batches", type=int, default=d.eval_batches, help="held-out batches per evaluation")
    o = ap.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=d.steps)
    o.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per optimizer step (all micro-batches)"
    )
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    o.add_argument("--seq-len", type=int, default=d.seq_len)
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    o.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio, help="cosine decays to lr * this")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip")
    o.add_argument("--b1", type=float, default=d.b1)
    o.add_argument("--b2", type=float, default=d.b2)
    o.add_argument("--param-dtype", choices=DTYPES, default=d.param_dtype, help="master weights / optimizer state")
    o.add_argument("--compute-dtype", choices=DTYPES, default=d.compute_dtype)
    o.add_argument(
        "--remat",
        choices=POLICY_NAMES,
        default=d.remat,
        help="activation checkpointing policy, applied per scanned block of layers",
    )
    o.add_argument(
        "--loss-chunk",
        type=int,
        default=d.loss_chunk,
        help="positions whose float32 logits the loss computes at a time (0: the whole sequence)",
    )
    o.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 GEMMs for linear layers and experts, forward and backward (DeepSeek-V3's tile-wise recipe; "
        "its numerics: not faster than bf16 yet)",
    )
    o.add_argument("--mtp-weight", type=float, default=d.mtp_weight, help="DeepSeek-V3: λ on the MTP loss (0 disables)")
    o.add_argument(
        "--router-bias-rate", type=float, default=d.router_bias_rate, help="DeepSeek-V3: γ of aux-loss-free balancing"
    )
    lo = ap.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=d.lora_rank, help="> 0: train LoRA adapters on the frozen model")
    lo.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    lo.add_argument(
        "--lora-targets",
        default=",".join(lora_lib.DEFAULT_TARGETS),
        help="comma-separated regexes matched against Linear names or paths (q,k,v,o,gate,up,down or "
        "moe_layers\\.experts\\..*)",
    )
    c = ap.add_argument_group("checkpoints, logging, export")
    c.add_argument(
        "--workdir", default=d.workdir, help="Orbax checkpoints (a directory or gs://...); an existing one is resumed"
    )
    c.add_argument(
        "--resume",
        nargs="?",
        const="required",
        default=d.resume,
        choices=RESUME_MODES,
        help="auto (default): continue from --workdir's latest checkpoint if there is one; "
        "--resume alone: fail if there is none; never: fail if there is one",
    )
    c.add_argument("--save-every", type=int, default=d.save_every)
    c.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    c.add_argument("--sync-save", action="store_true", help="block on checkpoint writes (default: async)")
    c.add_argument("--log-every", type=int, default=d.log_every)
    c.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU on unlisted hardware")
    c.add_argument("--export", default=None, help="write the final model (LoRA: merged) as a model directory")
    c.add_argument("--export-dtype", choices=DTYPES, default=d.export_dtype)
    s = ap.add_argument_group("devices")
    s.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=2,fsdp=4 (axes data, fsdp, tensor, expert)")
    s.add_argument(
        "--rules", default=None, help="sharding rule preset (single, fsdp, tensor, expert); default from the mesh"
    )
    s.add_argument(
        "--moe-capacity-factor",
        type=float,
        default=d.moe_capacity_factor,
        help="expert parallelism: bound each device pair's token buffer to this x its routed rows / ep and drop "
        "the overflow (default: capacity-free, nothing dropped; docs/scaling.md uses 2 on pods)",
    )
    s.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port (process 0)")
    s.add_argument("--num-processes", type=int, default=None)
    s.add_argument("--process-id", type=int, default=None)
    s.add_argument(
        "--distributed", action="store_true", help="start jax.distributed even without explicit settings (TPU pods)"
    )
    a = ap.parse_args(argv)

    mesh = None
    if a.mesh:
        from vishwam_jax.sharding import MeshError, parse_mesh

        try:
            mesh = parse_mesh(a.mesh)
        except MeshError as err:
            ap.error(f"--mesh: {err}")
    tc = TrainConfig(
        model=a.model,
        data=a.data,
        data_dtype=a.data_dtype,
        heldout_fraction=a.heldout_fraction,
        eval_every=a.eval_every,
        eval_batches=a.eval_batches,
        steps=a.steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        seq_len=a.seq_len,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        end_lr_ratio=a.end_lr_ratio,
        weight_decay=a.weight_decay,
        clip_norm=a.clip_norm,
        b1=a.b1,
        b2=a.b2,
        param_dtype=a.param_dtype,
        compute_dtype=a.compute_dtype,
        remat=a.remat,
        loss_chunk=a.loss_chunk,
        fp8=a.fp8,
        seed=a.seed,
        mtp_weight=a.mtp_weight,
        router_bias_rate=a.router_bias_rate,
        lora_rank=a.lora_rank,
        lora_alpha=a.lora_alpha,
        lora_targets=tuple(t for t in a.lora_targets.split(",") if t),
        workdir=a.workdir,
        save_every=a.save_every,
        keep=a.keep,
        resume=a.resume,
        async_save=not a.sync_save,
        log_every=a.log_every,
        export=a.export,
        export_dtype=a.export_dtype,
        mesh=mesh,
        rules=a.rules,
        moe_capacity_factor=a.moe_capacity_factor,
        peak_tflops=a.peak_tflops,
    )
    return a, tc


def main(argv=None) -> list[dict]:
    args, tc = parse_args(argv)
    from vishwam_jax.sharding import initialize_distributed

    # Before anything touches a device (the device list must be the global one). Without explicit
    # settings it starts only when the environment describes a multi-host job (TPU pod, SLURM,
    # JAX_COORDINATOR_ADDRESS...), so the same command runs on a laptop.
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, force=args.distributed)
    from vishwam_jax.training.trainer import train

    try:
        return train(tc)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad settings or data (unknown model, a batch the mesh cannot split, a checkpoint of another
        # run, token ids outside the vocabulary...): the message names the problem.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
