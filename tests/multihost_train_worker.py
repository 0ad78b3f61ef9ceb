"""One process of a two-process CPU training job (tests/test_training.py's multi-host test).

    python tests/multihost_train_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT_JSON EXPORT_DIR

Each process owns 4 CPU devices; jax.distributed joins them into one 8-device job (gloo
collectives), as scripts/launch_gpu_multinode.sh joins GPU nodes. The run trains gemma-tiny on an
fsdp=8 mesh, checkpoints into WORKDIR (every process writes its own shards), exports the final
model to EXPORT_DIR (together: each process its own shards) and writes the losses it saw to OUT_JSON.
"""

import json
import os
import sys

# Shared with the test: the same run on one process of 8 devices must give the same losses.
CONFIG = dict(
    model="gemma-tiny",
    steps=4,
    batch_size=8,
    seq_len=16,
    lr=1e-2,
    warmup_steps=1,
    compute_dtype="float32",
    mesh={"fsdp": 8},
    save_every=2,
    export_dtype="float32",
)


def main(pid: int, n: int, port: str, workdir: str, out: str, export: str) -> None:
    # Before jax starts: this process's share of the devices.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")

    from vishwam_jax.sharding import initialize_distributed
    from vishwam_jax.training.trainer import TrainConfig, train

    initialize_distributed(f"localhost:{port}", n, pid)
    assert jax.process_count() == n and jax.device_count() == 4 * n

    history = train(TrainConfig(**CONFIG, workdir=workdir, export=export), log=lambda line: None)
    with open(out, "w") as f:
        json.dump([h["loss"] for h in history], f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2], a[3], a[4], a[5])
