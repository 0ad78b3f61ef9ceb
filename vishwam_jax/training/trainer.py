"""The training loop behind scripts/train.py: any family, from scratch or from a converted checkpoint
(fully or with LoRA), optionally on a mesh, with exact resume from Orbax checkpoints.

    from vishwam_jax.training.trainer import TrainConfig, train
    history = train(TrainConfig(model="gemma-tiny", steps=100, workdir="/tmp/run"))

Running `train` again with the same workdir continues from the latest checkpoint and reproduces the
losses an uninterrupted run would have logged (bit for bit on CPU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vishwam_jax import models
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.models.interface import CausalLM
from vishwam_jax.models.remat import check_policy
from vishwam_jax.presets import UnknownModelError, get_config, list_models, replace
from vishwam_jax.quantization import is_storage_dtype
from vishwam_jax.sharding import eplb
from vishwam_jax.training import data as data_lib
from vishwam_jax.training import lora as lora_lib
from vishwam_jax.training import metrics as metrics_lib
from vishwam_jax.training import placement
from vishwam_jax.training.checkpointing import TrainCheckpoints, check_resumable
from vishwam_jax.training.objective import cast_floating, mtp_depths
from vishwam_jax.training.optimizer import make_optimizer, make_schedule
from vishwam_jax.training.step import (
    StepConfig,
    balancing_biases,
    frozen_from_gradients,
    init_state,
    make_eval_step,
    make_train_step,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
RESUME_MODES = ("auto", "required", "never")


@dataclasses.dataclass
class TrainConfig:
    model: str = "gemma-tiny"  # a preset (random init from `seed`) or a converted model directory
    data: str = "shakespeare"  # "shakespeare", a .npy of token ids, or a flat binary token file
    data_dtype: str = "uint16"  # element type of a flat binary token file
    heldout_fraction: float = 0.0  # train only on the stream before this tail (data.train_heldout_split)
    eval_every: int = 0  # > 0: held-out loss every this many steps and at the end (needs heldout_fraction)
    eval_batches: int = 8  # held-out batches (of batch_size / grad_accum windows) per evaluation
    steps: int = 100  # total optimizer steps (the schedule's length; a resumed run keeps it)
    batch_size: int = 8  # sequences per optimizer step, all micro-batches together
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum sequences each)
    seq_len: int = 128
    lr: float = 3e-4
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # the cosine ends at lr * end_lr_ratio
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    param_dtype: str = "float32"  # master weights and optimizer state
    compute_dtype: str = "bfloat16"  # forward/backward
    remat: str = "none"  # activation checkpointing policy (models/remat.py)
    loss_chunk: int = 256  # positions unembedded at a time by the loss; 0: the whole sequence at once
    fp8: bool = False  # DeepSeek-V3's FP8 GEMMs (numerics) for linear layers and experts
    seed: int = 0  # initialization and data order
    mtp_weight: float = 0.3  # DeepSeek-V3's λ on the MTP loss (ignored by families without MTP)
    router_bias_rate: float = 0.001  # DeepSeek-V3's γ (ignored by families without it; off with LoRA)
    lora_rank: int = 0  # > 0: fine-tune LoRA adapters of this rank on the frozen model
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    workdir: str | None = None  # Orbax checkpoints (local directory or gs://...)
    resume: str = "auto"  # auto: continue from workdir's latest checkpoint if any; required; never (start fresh only)
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    log_every: int = 1
    export: str | None = None  # write the final model (LoRA: merged) as a model directory
    export_dtype: str = "bfloat16"
    mesh: dict | None = None  # e.g. {"data": 2, "fsdp": 4}; None: one device
    rules: str | None = None  # a sharding rule preset; None: the sharding package's default for the mesh
    # Expert parallelism (a mesh with expert > 1): None exchanges tokens capacity-free (nothing dropped,
    # worst-case buffers); c bounds each device pair's buffer to c x its routed rows / ep and drops the
    # overflow (docs/scaling.md: c = 2 for DeepSeek-V3 on a pod).
    moe_capacity_factor: float | None = None
    peak_tflops: float | None = None  # per device, for MFU where the device is not in metrics.PEAK_FLOPS
    # EPLB load statistics (MoE): keep the last this-many steps' tokens per layer and expert on
    # device and write their sum to expert_load_out (.npz) at the end, for `python -m
    # vishwam_jax.sharding.eplb` to turn into a placement. 0: not collected.
    expert_load_window: int = 0
    expert_load_out: str | None = None

    def run_meta(self) -> dict:
        """What a checkpoint records to refuse resuming a different run (checkpointing.check_resumable)."""
        lora = (
            None
            if not self.lora_rank
            else {"rank": self.lora_rank, "alpha": self.lora_alpha, "targets": list(self.lora_targets)}
        )
        return {
            "model": self.model if self.model in list_models() else "",
            "init_from": "" if self.model in list_models() else str(Path(self.model).expanduser().absolute()),
            "data": self.data if not self.heldout_fraction else f"{self.data} (heldout {self.heldout_fraction})",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "lora": lora,
        }


def _check_model(model: str) -> None:
    """A preset name or an existing directory; a typo gets the close preset names."""
    if model in list_models() or Path(model).expanduser().is_dir():
        return
    if "/" in model or model.startswith((".", "~")):
        raise FileNotFoundError(f"model directory {model} does not exist")
    try:
        get_config(model)
    except UnknownModelError as err:
        raise UnknownModelError(f"{err} (and no directory named {model!r} exists)") from None


def load_model(tc: TrainConfig, mesh=None, rules=None) -> tuple[Any, CausalLM, nnx.State, list[Path]]:
    """(config, module, params, tokenizer files to carry into an export).

    A preset is initialised from `seed`; a directory is restored (onto the parameters' shardings on
    `mesh`, from their logical axes, when given): both by `vishwam_jax.load`. Full training keeps
    float master weights in param_dtype; LoRA keeps the base as stored. `module` is the abstract
    module of the training config (`remat_policy` set: configs are frozen, so it is a new config and
    a new graphdef); `params` is the parameter state the train step takes explicitly.
    """
    from vishwam_jax.loading import load

    param_dtype = DTYPES[tc.param_dtype]
    if tc.model in list_models():
        source, dtype, files = get_config(tc.model), param_dtype, []
    else:
        path = Path(tc.model).expanduser()
        source, dtype, files = path, (None if tc.lora_rank else param_dtype), sorted(path.glob("tokenizer*"))
    # Stacked and scanned on every backend: per-layer buffers are a serving layout (models/stack.py),
    # and a scanned train step compiles in the time of one layer.
    model = load(source, dtype=dtype, mesh=mesh, rules=rules, seed=tc.seed, unstack_layers=False)
    config = replace(model.config, remat_policy=tc.remat)
    return config, models.abstract(config), model.params, files


class _StepLog:
    """Reports each step once its metrics are ready, in order. The loop prepares the next batch
    (host reads, host-to-device copy) while the device still runs the previous step and only then
    waits for it (`flush`), so step times are exact: the interval between consecutive steps' results."""

    def __init__(self, tc: TrainConfig, flops_per_token: float, on_step: Callable | None, log: Callable):
        self.tc, self.flops, self.on_step, self.log = tc, flops_per_token, on_step, log
        self.pending: tuple[int, dict] | None = None
        self.last = time.perf_counter()
        peak = metrics_lib.peak_flops()
        self.peak = tc.peak_tflops * 1e12 if tc.peak_tflops else peak
        self.history: list[dict] = []
        self.first = True

    def push(self, step: int, metrics: dict) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.history.append({"step": step, **host})
        if step % self.tc.log_every == 0 or step == self.tc.steps - 1 or "eval_loss" in host:
            tokens = self.tc.batch_size * self.tc.seq_len
            note = "(includes compilation)" if self.first else ""
            if "eval_loss" in host:
                note = f"held-out loss {host['eval_loss']:.4f} (time includes it) {note}".strip()
            self.log(
                metrics_lib.format_step(step, host, seconds, tokens, self.flops, jax.device_count(), self.peak, note)
            )
        self.first = False
        if self.on_step is not None:
            self.on_step(step, host)


def train(
    tc: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print
) -> list[dict]:
    """Run (or resume) training to `tc.steps`; returns the metrics of the steps run in this call.

    on_step(step, metrics) is called after each step in order (metrics as floats); an exception it
    raises stops training like a crash would, after in-flight checkpoint writes have finished.
    """
    check_policy(tc.remat)
    if tc.loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0 (0: the whole sequence), got {tc.loss_chunk}")
    _check_model(tc.model)
    if jax.process_index() != 0:  # one host reports (on_step still runs everywhere)
        log = lambda line: None
    if tc.resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {', '.join(RESUME_MODES)}, got {tc.resume!r}")
    if tc.resume == "required" and not tc.workdir:
        raise ValueError("resume='required' needs a workdir to resume from")
    if tc.batch_size % tc.grad_accum:
        raise ValueError(f"batch_size {tc.batch_size} is not a multiple of grad_accum {tc.grad_accum}")
    micro = tc.batch_size // tc.grad_accum
    compute_dtype = DTYPES[tc.compute_dtype]

    mesh = rules = None
    if tc.mesh:
        from vishwam_jax.sharding import make_mesh, resolve_rules

        mesh = make_mesh(**tc.mesh)
        rules = resolve_rules(tc.rules, mesh)
    if tc.moe_capacity_factor is not None:
        if not tc.moe_capacity_factor > 0:
            raise ValueError(
                f"moe_capacity_factor must be positive (or None: capacity-free); got {tc.moe_capacity_factor}"
            )
        if mesh is None or mesh.shape.get("expert", 1) == 1:
            raise ValueError(
                "moe_capacity_factor bounds the expert-parallel token exchange, but the mesh "
                f"{tc.mesh or 'none'} has no "
                "expert axis larger than 1 (e.g. mesh fsdp=2,expert=4)"
            )
    # Checked before the (possibly huge) model is loaded: the batch must split over the mesh.
    batch_sh = None if mesh is None else placement.batch_sharding(mesh, rules, micro)
    tokens = data_lib.load_tokens(tc.data, tc.data_dtype)
    heldout = None
    if tc.heldout_fraction:
        tokens, heldout = data_lib.train_heldout_split(tokens, tc.heldout_fraction)
    eval_host = _eval_batches(tc, heldout, micro)
    lora_cfg = lora_lib.LoraConfig(tc.lora_rank, tc.lora_alpha, tuple(tc.lora_targets)) if tc.lora_rank else None
    meta = tc.run_meta()
    ckpt = (
        TrainCheckpoints(tc.workdir, save_every=tc.save_every, keep=tc.keep, async_save=tc.async_save)
        if tc.workdir
        else None
    )
    latest = None if ckpt is None else ckpt.latest_step()
    if latest is None and tc.resume == "required":
        ckpt.close()
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {ckpt.directory}")
    if latest is not None and tc.resume == "never":
        ckpt.close()
        raise FileExistsError(
            f"{ckpt.directory} already holds checkpoints (latest: step {latest}); use another workdir or resume"
        )
    config, module, params, tokenizer_files = load_model(tc, mesh, rules)

    if lora_cfg is None:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        quantized = [lora_lib.leaf_name(p) for p, x in flat if is_storage_dtype(x.dtype)]
        if quantized:
            raise ValueError(
                f"{len(quantized)} weights are quantized (e.g. {quantized[0]}): "
                "they cannot take gradient steps; fine-tune with LoRA (--lora-rank) or convert without --quantize"
            )
        trainable, frozen = params, None
    else:
        trainable = lora_lib.init_adapters(params, lora_cfg, jax.random.fold_in(jax.random.key(tc.seed), 1))
        frozen = params
        if mesh is not None:
            trainable = jax.device_put(trainable, placement.replicated(mesh))

    depths = mtp_depths(module, tc.mtp_weight)
    # Aux-loss-free balancing where the model has its biases (DeepSeek-V3), and only in full training.
    balancing = lora_cfg is None and module.capabilities.moe and bool(balancing_biases(params))
    bias_rate = tc.router_bias_rate if balancing else 0.0
    schedule = make_schedule(tc.lr, tc.steps, warmup_steps=tc.warmup_steps, end_ratio=tc.end_lr_ratio)
    optimizer = make_optimizer(
        schedule,
        weight_decay=tc.weight_decay,
        clip_norm=tc.clip_norm,
        b1=tc.b1,
        b2=tc.b2,
        frozen=frozen_from_gradients if lora_cfg is None else None,
    )
    step_cfg = StepConfig(
        compute_dtype=compute_dtype,
        mtp_weight=tc.mtp_weight if depths else 0.0,
        router_bias_rate=bias_rate,
        lora=lora_cfg,
        expert_counts=bool(tc.expert_load_window),
        loss_chunk=tc.loss_chunk or None,
        fp8=tc.fp8,
    )

    state_sh = None
    if mesh is None:
        state = init_state(trainable, optimizer)
    else:
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        if lora_cfg is None:  # the parameters' own logical axes; Adam's moments follow them
            trainable_sh = placement.model_shardings(shapes, mesh, rules, config)
        else:  # adapters are small: replicated
            trainable_sh = jax.tree_util.tree_map(lambda _: placement.replicated(mesh), trainable)
        state_sh = placement.state_shardings(trainable_sh, shapes, optimizer, mesh)
        state = jax.jit(lambda t: init_state(t, optimizer), out_shardings=state_sh)(trainable)
    global_shape = (tc.grad_accum, micro, tc.seq_len + 1)
    rows = None if batch_sh is None or jax.process_count() == 1 else placement.local_rows(batch_sh, global_shape)
    train_step = make_train_step(
        module,
        optimizer,
        step_cfg,
        schedule=schedule,
        state_shardings=state_sh,
        metrics_sharding=None if mesh is None else placement.replicated(mesh),
    )
    if eval_host:
        eval_step = make_eval_step(module, step_cfg, out_sharding=None if mesh is None else placement.replicated(mesh))
        eval_shape = (1, micro, tc.seq_len + 1)
        eval_rows = None if batch_sh is None or jax.process_count() == 1 else placement.local_rows(batch_sh, eval_shape)

        def held_out_loss(trainable):
            nll = count = 0.0
            for host_batch in eval_host:
                local = host_batch if eval_rows is None else host_batch[eval_rows]
                n, c = eval_step(trainable, frozen, placement.device_batch(local, batch_sh, eval_shape))
                nll, count = nll + n, count + c
            return nll / jnp.maximum(count, 1.0)

    start = 0
    if latest is not None:
        start = latest
        state, saved = ckpt.restore(start, state)
        try:
            check_resumable(saved, meta)
        except ValueError:
            ckpt.close()
            raise
        log(f"resumed from {ckpt.directory} at step {start}")

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    flops = metrics_lib.train_flops_per_token(params, config, tc.seq_len, depths)
    if lora_cfg is not None:
        log(
            f"LoRA rank {lora_cfg.rank} alpha {lora_cfg.alpha}: {len(trainable)} adapted weights, "
            f"{lora_lib.count(trainable):,} trainable of {n_params:,} parameters"
        )
    log(
        f"{config.get('name') or config.family}: {n_params / 1e6:.1f}M parameters, {flops / 1e9:.3f} GFLOP/token, "
        f"batch {tc.batch_size}x{tc.seq_len} ({tc.grad_accum} micro-batches), remat {tc.remat}, "
        f"compute {tc.compute_dtype}{' with FP8 GEMMs' if tc.fp8 else ''}, mesh {tc.mesh or 'none'}"
    )

    steplog = _StepLog(tc, flops, on_step, log)
    context = _mesh_context(mesh, rules, tc.moe_capacity_factor)
    load_window = None
    try:
        with context:
            for step in range(start, tc.steps):
                host = data_lib.batch_at(tokens, step, tc.batch_size, tc.seq_len, tc.seed, rows=rows)
                if host.max(initial=0) >= config.vocab_size:
                    raise ValueError(
                        f"token id {host.max()} at step {step} is outside the vocabulary of {config.vocab_size}"
                    )
                batch = placement.device_batch(host, batch_sh, global_shape)
                steplog.flush()  # the previous step, which ran while this batch was prepared
                state, metrics = train_step(state, frozen, batch)
                if "expert_counts" in metrics:
                    metrics = dict(metrics)
                    counts = metrics.pop("expert_counts")
                    if load_window is None:
                        # On the counts' devices (replicated over a mesh), so recording never moves them.
                        fresh = eplb.LoadWindow.zeros(tc.expert_load_window, *counts.shape)
                        load_window = jax.device_put(fresh, counts.sharding)
                    load_window = eplb.record_load(load_window, counts)  # on device: no sync per step
                if eval_host and ((step + 1) % tc.eval_every == 0 or step + 1 == tc.steps):
                    metrics = {**metrics, "eval_loss": held_out_loss(state["params"])}
                steplog.push(step, metrics)
                if ckpt is not None:
                    ckpt.save(step + 1, state, meta, force=step + 1 == tc.steps)
            steplog.flush()
        if load_window is not None and tc.expert_load_out:
            load_window.save(tc.expert_load_out)
            log(
                f"wrote the expert loads of the last {min(int(load_window.filled), tc.expert_load_window)} steps "
                f"to {tc.expert_load_out}"
            )
    finally:
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()

    if tc.export:
        export(tc, config, state["params"], frozen, lora_cfg, tokenizer_files)
        log(f"wrote {tc.export}")
    return steplog.history


def _eval_batches(tc: TrainConfig, heldout: np.ndarray | None, micro: int) -> list[np.ndarray]:
    """The first `eval_batches` batches of consecutive held-out windows (the same every time)."""
    if not tc.eval_every:
        return []
    if heldout is None:
        raise ValueError("eval_every needs a held-out split: set heldout_fraction (--heldout-fraction), e.g. 0.01")
    batches = []
    for b in data_lib.heldout_batches(heldout, micro, tc.seq_len):
        batches.append(b)
        if len(batches) == tc.eval_batches:
            break
    if not batches:
        raise ValueError(
            f"the held-out split ({len(heldout)} tokens) is too small for one batch of {micro} x {tc.seq_len + 1}"
        )
    return batches


def _mesh_context(mesh, rules, moe_capacity_factor: float | None):
    if mesh is None:
        import contextlib

        return contextlib.nullcontext()
    from vishwam_jax.sharding import use_mesh

    return use_mesh(mesh, rules, moe_capacity_factor=moe_capacity_factor)


def export(tc: TrainConfig, config, trainable: Any, frozen: Any, lora_cfg, files: list[Path]) -> None:
    """Write the trained model as a model directory loadable by `vishwam_jax.load`. Multi-host: every
    process calls it; each writes its own shards and process 0 completes the directory
    (orbax_io.save_params), which must be on storage all hosts share."""
    _write_export(tc, config, trainable, frozen, lora_cfg, files)


def _write_export(tc: TrainConfig, config, trainable: Any, frozen: Any, lora_cfg, files: list[Path]) -> None:
    config = replace(config, remat_policy="none")  # a training setting, not part of the model
    dtype = DTYPES[tc.export_dtype]
    if lora_cfg is not None:
        lora_lib.export_merged(
            tc.export, frozen, trainable, lora_cfg, config, int8_dtype=dtype, overwrite=True, files=tuple(files)
        )
        return
    # The parameter state as vishwam_jax.load expects it (routers stay float32, quantized weights as they are).
    orbax_io.save_params(tc.export, cast_floating(trainable, dtype), config, overwrite=True, files=tuple(files))


def evaluate(model: CausalLM, tokens: np.ndarray, batch_size: int, seq_len: int, compute_dtype=None) -> float:
    """Mean next-token loss of the module `model` (e.g. `vishwam_jax.load(dir).module`) over
    consecutive windows of `tokens` (e.g. a held-out split)."""
    from vishwam_jax.training.objective import next_token_loss

    graphdef, params = nnx.split(model, nnx.Param)
    loss = jax.jit(lambda p, b: next_token_loss(graphdef, p, b, compute_dtype))
    losses = [float(loss(params, jnp.asarray(b))) for b in data_lib.heldout_batches(tokens, batch_size, seq_len)]
    if not losses:
        raise ValueError(f"{len(tokens)} tokens are too few for one batch of {batch_size} x {seq_len}")
    return float(np.mean(losses))
