"""Training and fine-tuning for every family (docs/training.md).

    trainer        the loop behind scripts/train.py: TrainConfig, train, evaluate, export
    step           the jitted train step over the module's nnx.State (merged inside jit; micro-batch
                   accumulation, bf16 compute on float32 masters, DeepSeek-V3's router-bias balancing)
    objective      next-token and MTP losses as sums over target tokens
    optimizer      optax AdamW + warmup/cosine + global-norm clipping, frozen leaves
    lora           LoRA adapters on Linear kernels (one per stacked layer / expert), merge, merged export
    data           the Shakespeare corpus and memory-mapped token files, batches by (seed, step)
    placement      train state and batches on a mesh (multi-host batch rows)
    checkpointing  Orbax CheckpointManager with async saves and resume checks
    metrics        model FLOPs, MFU, memory for the per-step log line

Activation checkpointing policies live with the models (models/remat.py), which apply them per scanned
block; training selects one by `presets.replace(config, remat_policy=...)` (configs are frozen).
"""
