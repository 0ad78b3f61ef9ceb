"""Training: loss goes down on the demo corpus, exact resume, gradient accumulation, remat policies
(applied per scanned block), bf16 compute on float32 master weights, LoRA (adapters only; merged
export; int8 and stacked expert weights), DeepSeek-V3's MTP loss and router-bias balancing, and a
sharded step equal to one unsharded. The step takes the nnx.State of the module's parameters
explicitly. Small models and few steps: the whole file is meant to run in a few minutes on 2 CPU cores."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vishwam_jax as vj
from vishwam_jax import models
from vishwam_jax.checkpoint import orbax_io
from vishwam_jax.models import remat
from vishwam_jax.presets import get_config
from vishwam_jax.quantization import Quantization
from vishwam_jax.quantization.params import quantize_params
from vishwam_jax.training import data, lora, metrics
from vishwam_jax.training.checkpointing import ResumeMismatchError
from vishwam_jax.training.objective import loss_sums, next_token_loss
from vishwam_jax.training.optimizer import make_optimizer
from vishwam_jax.training.step import (
    StepConfig,
    frozen_from_gradients,
    init_state,
    make_train_step,
)
from vishwam_jax.training.trainer import TrainConfig, train

try:
    from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # older jax
    from jax.core import ClosedJaxpr, Jaxpr

ROOT = Path(__file__).resolve().parents[1]

# DeepSeek-V3's parameter paths (models/deepseek_v3.py): the stacked MoE layers, their shared
# expert, the MTP module's routed experts, and the routers' balancing biases.
DS_EXPERTS = "moe_layers.experts"
DS_SHARED = "moe_layers.shared"
DS_MTP_EXPERTS = "mtp_layers.block.experts"
DS_ROUTER_BIAS = "moe_layers.router.bias"
DS_MTP_ROUTER_BIAS = "mtp_layers.block.router.bias"


def _tiny(name="gemma-tiny", seed=0, **overrides):
    """A small model of preset `name` (config overrides applied) and its parameter state."""
    module = models.build(get_config(name, **overrides), rngs=nnx.Rngs(seed))
    return module, nnx.state(module, nnx.Param)


def _graphdef(module):
    return nnx.split(module, nnx.Param)[0]


def _param(state, name: str):
    """The array of the parameter at dotted path `name` ("blocks.layers.0.attn.q.kernel")."""
    node = state
    for key in name.split("."):
        node = node[int(key) if key.isdigit() else key]
    return node[...]


def _batch(config, k, b, t, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, config.vocab_size, size=(k, b, t + 1)), jnp.int32)


def _smooth_adamw():
    """AdamW whose first update is lr * g / (|g| + 1), not lr * sign(g): equivalence tests compare
    updated parameters, and a sign flips on gradients of ~1e-9 that differ only by rounding."""
    return make_optimizer(1e-2, 10, warmup_steps=0, eps=1.0)


def _state(params, opt):
    # The step donates its state: give it a copy so the test keeps `params`.
    return init_state(jax.tree_util.tree_map(jnp.copy, params), opt)


def _tree_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _quiet(_line):
    pass


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each `train` call jits its own step; runs of the same program (the resume test's three, the
    CLI's) then compile once. Only this module's tests see the cache."""
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


# -- the trainer end to end ------------------------------------------------------------------------
def test_loss_decreases_on_shakespeare():
    tc = TrainConfig(
        model="gemma-tiny",
        steps=40,
        batch_size=8,
        seq_len=64,
        lr=1e-2,
        warmup_steps=5,
        heldout_fraction=0.02,
        eval_every=20,
        eval_batches=4,
    )
    logs = []
    history = train(tc, log=logs.append)
    losses = [h["loss"] for h in history]
    assert len(losses) == 40 and np.isfinite(losses).all()
    # Bytes start near ln(256) = 5.5; a byte-frequency model alone reaches ~3.3.
    assert np.mean(losses[:3]) > 5.0
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.5, losses
    # ... and so does the loss on text it never trained on (the corpus' last 2%), at steps 19 and 39.
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals) == [19, 39] and evals[39] < evals[19] < 5.0, evals
    assert sum("held-out loss" in line for line in logs) == 2
    with pytest.raises(ValueError, match="heldout_fraction"):
        train(TrainConfig(model="gemma-tiny", eval_every=10), log=_quiet)


def test_resume_is_exact_after_a_crash(tmp_path):
    common = dict(
        model="gemma-tiny", steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, compute_dtype="bfloat16"
    )
    uninterrupted = [h["loss"] for h in train(TrainConfig(**common), log=_quiet)]

    class Crash(Exception):
        pass

    def crash_at_3(step, _metrics):
        if step == 3:
            raise Crash

    tc = TrainConfig(**common, workdir=str(tmp_path / "run"), save_every=2)
    with pytest.raises(Crash):
        train(tc, on_step=crash_at_3, log=_quiet)
    logs = []
    resumed = train(tc, log=logs.append)
    start = resumed[0]["step"]
    assert any("resumed" in line for line in logs) and 0 < start < 6
    # Bit for bit: the restored parameters, Adam moments, step and data position are the saved ones.
    assert [h["loss"] for h in resumed] == uninterrupted[start:]
    # A different batch size would silently be a different run: refused.
    with pytest.raises(ResumeMismatchError, match="batch_size"):
        train(TrainConfig(**{**common, "batch_size": 8, "steps": 8}, workdir=str(tmp_path / "run")), log=_quiet)
    # Explicit intent (scripts/train.py --resume / --resume never) is checked, not guessed.
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainConfig(**common, workdir=str(tmp_path / "empty"), resume="required"), log=_quiet)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(TrainConfig(**common, workdir=str(tmp_path / "run"), resume="never"), log=_quiet)


def test_two_process_run_equals_one_process_and_resumes_on_another_topology(tmp_path):
    """Two processes x 4 CPU devices (jax.distributed, like two GPU nodes or TPU hosts): each host
    feeds only its own batch rows and writes its own checkpoint and export shards. The losses and the
    export equal one process with 8 devices; that one process resumes the two-process checkpoint
    exactly and exports it."""
    import json
    import shutil
    import socket
    import subprocess

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from multihost_train_worker import CONFIG
    finally:
        sys.path.pop(0)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    workdir = tmp_path / "run"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "multihost_train_worker.py")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                worker,
                str(i),
                "2",
                port,
                str(workdir),
                str(tmp_path / f"losses_{i}.json"),
                str(tmp_path / "two_procs"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    two = [json.loads((tmp_path / f"losses_{i}.json").read_text()) for i in range(2)]
    assert two[0] == two[1] and len(two[0]) == 4

    one = [h["loss"] for h in train(TrainConfig(**CONFIG, export=str(tmp_path / "one")), log=_quiet)]
    np.testing.assert_allclose(two[0], one, rtol=1e-5)
    # The export both processes wrote together: complete, nothing half-written left beside it, and
    # the same model as the one-process export.
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
    together, alone = orbax_io.restore_params(tmp_path / "two_procs"), orbax_io.restore_params(tmp_path / "one")
    assert jax.tree_util.tree_structure(together) == jax.tree_util.tree_structure(alone)
    for a, b in zip(jax.tree_util.tree_leaves(together), jax.tree_util.tree_leaves(alone)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert orbax_io.read_config(tmp_path / "two_procs").to_dict() == orbax_io.read_config(tmp_path / "one").to_dict()
    tokens = [[5, 6, 7, 8]]
    np.testing.assert_allclose(
        np.asarray(vj.load(tmp_path / "two_procs").logits(tokens)),
        np.asarray(vj.load(tmp_path / "one").logits(tokens)),
        rtol=1e-4,
        atol=1e-5,
    )
    # As if the two-process run had died before its final save: one process continues from step 2.
    final = workdir / "4"
    shutil.move(final, tmp_path / "final")
    logs = []
    resumed = train(TrainConfig(**CONFIG, workdir=str(workdir)), log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs), logs
    np.testing.assert_allclose([h["loss"] for h in resumed], one[2:], rtol=1e-5)
    # The two-process final checkpoint, exported on one host (resume at step 4, no step run).
    shutil.rmtree(final)
    shutil.move(tmp_path / "final", final)
    assert train(TrainConfig(**CONFIG, workdir=str(workdir), export=str(tmp_path / "two")), log=_quiet) == []
    for a, b in zip(
        jax.tree_util.tree_leaves(orbax_io.restore_params(tmp_path / "two")),
        jax.tree_util.tree_leaves(orbax_io.restore_params(tmp_path / "one")),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cli_trains_and_exports_a_loadable_model(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_cli
    finally:
        sys.path.pop(0)
    out = tmp_path / "model"
    # Trained under a remat policy, which must not leak into the exported model's config.
    first = train_cli.main(
        [
            "--model",
            "gemma-tiny",
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "2",
            "--remat",
            "full",
            "--export",
            str(out),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    step_lines = [ln for ln in lines if ln.startswith("step")]
    assert len(step_lines) == 6
    # loss, throughput, MFU (model TFLOP/s per device where the peak is unknown, as on CPU), memory
    assert re.search(
        r"loss \d+\.\d+ .*[\d,]+ tok/s .*(MFU [\d.]+%|[\d.]+ TFLOP/s/dev) .*(mem|RSS) [\d.]+", step_lines[1]
    ), step_lines[1]
    model = vj.load(out)
    # The training settings are not part of the exported model (remat is inference's "none").
    assert model.config.name == "gemma-tiny" and model.config.remat_policy == "none"
    assert np.isfinite(np.asarray(model.logits([[5, 6, 7]]))).all()
    # Full fine-tuning from a model directory (float32 masters from the bf16 export): it starts
    # where the first run ended, not from scratch.
    again = train_cli.main(
        [
            "--model",
            str(out),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "2",
            "--log-every",
            "100",
        ]
    )
    assert again[0]["loss"] < first[0]["loss"] - 0.1, (again[0], first[0])
    np.testing.assert_allclose(again[0]["loss"], first[-1]["loss"], atol=0.3)
    # Bad settings end with a message naming the problem (exit 2), before any model is built.
    capsys.readouterr()
    for argv, message in [
        (["--model", "gemma2-2bb"], "did you mean gemma2-2b"),
        (["--mesh", "fsdp=3"], "needs 3 devices"),
        (["--mesh", "fsdp=8", "--batch-size", "4"], "does not divide"),
        (["--batch-size", "6", "--grad-accum", "4"], "not a multiple of grad_accum"),
        (["--data", str(tmp_path / "missing.bin")], "neither 'shakespeare' nor an existing token file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_moe_capacity_factor_reaches_the_expert_exchange(capsys):
    """--moe-capacity-factor is the trained step's capacity: a tiny one drops tokens and changes the
    loss of the capacity-free default (that an ample one drops nothing is test_expert_parallel's);
    bad settings are named."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_cli
    finally:
        sys.path.pop(0)
    common = [
        "--model",
        "grok-1-tiny",
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--warmup-steps",
        "1",
        "--compute-dtype",
        "float32",
        "--mesh",
        "fsdp=2,expert=4",
        "--log-every",
        "100",
    ]
    assert train_cli.parse_args(common)[1].moe_capacity_factor is None  # default: capacity-free
    free = [h["loss"] for h in train_cli.main(common)]
    tiny = [h["loss"] for h in train_cli.main(common + ["--moe-capacity-factor", "0.05"])]
    assert abs(tiny[0] - free[0]) > 1e-4, (tiny, free)
    capsys.readouterr()
    for argv, message in [
        (["--moe-capacity-factor", "0"], "must be positive"),
        (["--moe-capacity-factor", "2", "--mesh", "fsdp=8"], "no expert axis larger than 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main(["--model", "grok-1-tiny"] + argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


# -- the train step --------------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch():
    module, params = _tiny()
    config = module.config
    big = np.array(_batch(config, 1, 8, 16))
    # Padding only in the second half: per-micro-batch means would weight its tokens differently.
    big[0, 4:, 10:] = config.pad_token_id
    opt = _smooth_adamw()
    step = make_train_step(module, opt, StepConfig())
    state_1, m_1 = step(_state(params, opt), None, jnp.asarray(big))
    state_2, m_2 = step(_state(params, opt), None, jnp.asarray(big.reshape(2, 4, 17)))
    np.testing.assert_allclose(float(m_1["loss"]), float(m_2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_1["grad_norm"]), float(m_2["grad_norm"]), rtol=1e-5)
    chex.assert_trees_all_close(state_1["params"], state_2["params"], rtol=1e-5, atol=1e-6)
    assert not _tree_equal(state_1["params"], params)


@pytest.mark.parametrize(
    "name, overrides",
    [("gemma-tiny", {"final_logit_softcap": 30.0}), ("deepseek-v3-tiny", {"num_layers": 2, "num_dense_layers": 1})],
)
def test_chunked_cross_entropy_equals_the_whole_sequence(name, overrides):
    """Logits a few positions at a time (7: not a divisor of 16, so the last piece is padded), with
    padding targets, MTP (DeepSeek) and Gemma's final soft cap: same loss and gradients."""
    module, params = _tiny(name, **overrides)
    graphdef = _graphdef(module)
    batch = np.array(_batch(module.config, 1, 2, 16)[0])
    batch[1, 12:] = module.config.pad_token_id
    depths = 1 if module.capabilities.mtp else 0

    def loss(p, chunk):
        sums = loss_sums(nnx.merge(graphdef, p), jnp.asarray(batch), depths, loss_chunk=chunk)
        return sums["nll"] + sums.get("mtp", jnp.zeros(1)).sum()

    loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    whole, whole_grads = loss_and_grads(params, None)
    chunked, chunked_grads = loss_and_grads(params, 7)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-5)
    # Summed in another order (jitted, in pieces): float32 rounding of 1e-6 on entries near 1e-3 was
    # seen on CI, so the absolute floor is 1e-5, far below the gradients' scale (up to ~0.1).
    chex.assert_trees_all_close(chunked_grads, whole_grads, rtol=1e-4, atol=1e-5)


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """Chunked, the compiled gradient no longer holds the float32 [tokens, vocab] logits and their
    gradient (what remains is the embedding's gradient, parameters and activations)."""
    module, params = _tiny("gemma-tiny", vocab_size=32_768)
    graphdef = _graphdef(module)
    batch = _batch(module.config, 1, 2, 256)[0]
    logits_bytes = batch.shape[0] * (batch.shape[1] - 1) * 32_768 * 4

    def temporaries(chunk) -> int:
        grad = jax.grad(lambda p: loss_sums(nnx.merge(graphdef, p), batch, loss_chunk=chunk)["nll"])
        return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes

    whole = temporaries(None)
    assert whole > 2 * logits_bytes
    assert whole - temporaries(8) > 1.5 * logits_bytes  # measured: 150.6 MB -> 29.1 MB, logits 67.1 MB


def _remat_regions(fn, *args) -> tuple[int, int]:
    """(checkpointed regions inside a scan body, checkpointed regions outside any scan) in the
    jaxpr of fn(*args), searched through every nested jaxpr."""
    found = {True: 0, False: 0}

    def walk(jaxpr, in_scan: bool) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("remat2", "checkpoint"):
                found[in_scan] += 1
            inner = in_scan or eqn.primitive.name == "scan"
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(sub, ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, Jaxpr):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return found[True], found[False]


@pytest.mark.parametrize(
    "name,policies", [("gemma-tiny", remat.POLICY_NAMES), ("grok-1-tiny", ("none", "dots_with_no_batch_dims_saveable"))]
)
def test_remat_policies_give_the_same_loss_and_gradients(name, policies):
    results = {}
    for policy in policies:
        # Configs are frozen: the policy is a field of a new config, so a new graphdef.
        module, params = _tiny(name, seed=1, num_layers=2, remat_policy=policy)
        graphdef = _graphdef(module)
        batch = _batch(module.config, 1, 2, 16)[0]
        fn = jax.value_and_grad(lambda p, g=graphdef, b=batch: next_token_loss(g, p, b))
        # The policy is really applied (one checkpointed region: the scanned stack's layer body,
        # traced once) or really absent.
        assert _remat_regions(fn, params) == ((0, 0) if policy == "none" else (1, 0)), policy
        results[policy] = jax.jit(fn)(params)
    loss0, grads0 = results["none"]
    for policy, (loss, grads) in results.items():
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)):
            # Recomputation may fuse (and so round) differently: equal up to float32 rounding.
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * np.abs(np.asarray(b)).max(), err_msg=policy
            )
    with pytest.raises(ValueError, match="dots_saveable"):
        remat.check_policy("dots")


@pytest.mark.parametrize("num_layers", [5, 9])
def test_remat_applies_per_scanned_block(num_layers):
    """Gemma 2 scans its local/global periods (2 layers each) and runs the odd layer left over
    unstacked: the train step's gradient checkpoints the scan body once and the leftover block once,
    whatever the depth (the policy wraps each scanned block, not each layer of an unrolled loop)."""
    module, params = _tiny("gemma2-tiny", num_layers=num_layers, remat_policy="full")
    assert module.tail is not None and len(module.tail.layers) == 1
    opt = _smooth_adamw()
    step = make_train_step(module, opt, StepConfig(compute_dtype=jnp.bfloat16))
    batch = _batch(module.config, 1, 2, 12)
    assert _remat_regions(step, _state(params, opt), None, batch) == (1, 1)
    plain, _ = _tiny("gemma2-tiny", num_layers=num_layers)
    assert _remat_regions(make_train_step(plain, opt, StepConfig()), _state(params, opt), None, batch) == (0, 0)


def test_bf16_compute_keeps_float32_master_weights():
    module, params = _tiny()
    graphdef = _graphdef(module)
    batch = _batch(module.config, 1, 2, 16)
    opt = make_optimizer(1e-2, 10, warmup_steps=0)
    state = _state(params, opt)
    step_bf16 = make_train_step(module, opt, StepConfig(compute_dtype=jnp.bfloat16))
    for _ in range(2):
        state, m_bf16 = step_bf16(state, None, batch)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state["params"], state["opt_state"])) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}
    # ... while the matmuls really run in bf16 (and so the loss differs from float32 compute).
    jaxpr = str(jax.make_jaxpr(lambda p: next_token_loss(graphdef, p, batch[0], jnp.bfloat16))(params))
    assert "bf16" in jaxpr and "dot_general" in jaxpr
    loss32 = float(jax.jit(lambda p: next_token_loss(graphdef, p, batch[0]))(params))
    loss16 = float(jax.jit(lambda p: next_token_loss(graphdef, p, batch[0], jnp.bfloat16))(params))
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05


def test_frozen_leaves_get_no_update():
    params = {"w": jnp.ones((2, 2)), "router": {"bias": jnp.zeros((4,))}}
    grads = {"w": jnp.ones((2, 2)), "router": {"bias": jnp.ones((4,))}}
    opt = make_optimizer(0.1, 10, warmup_steps=0, frozen=frozen_from_gradients)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert np.all(np.asarray(updates["router"]["bias"]) == 0) and np.all(np.asarray(updates["w"]) < 0)


def test_stacked_norms_do_not_decay():
    """AdamW decays matrices only: a stacked norm scale [layers, d] is a vector per layer."""
    _, params = _tiny()
    opt = make_optimizer(1.0, 10, warmup_steps=0, weight_decay=0.5, clip_norm=1e9)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    assert np.all(np.asarray(_param(updates, "blocks.layers.0.attn_norm.scale")) == 0)
    assert np.all(np.asarray(_param(updates, "final_norm.scale")) == 0)
    q = np.asarray(_param(params, "blocks.layers.0.attn.q.kernel"))
    np.testing.assert_allclose(np.asarray(_param(updates, "blocks.layers.0.attn.q.kernel")), -0.5 * q, rtol=1e-6)


# -- LoRA --------------------------------------------------------------------------------------------
def test_lora_trains_only_the_adapters():
    module, base = _tiny()
    config = module.config
    base_copy = jax.tree_util.tree_map(np.array, base)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "down"))
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    assert sorted({n.rsplit(".", 2)[1] for n in adapters}) == ["down", "gate", "o", "q", "v"]
    # One adapter per stacked layer: the kernel's leading "layers" axis leads the adapter too.
    layers = config.num_layers
    chex.assert_shape(adapters["blocks.layers.0.attn.q.kernel"]["a"], (layers, 64, 4))
    chex.assert_shape(adapters["blocks.layers.0.attn.q.kernel"]["b"], (layers, 4, 4 * 16))
    opt = make_optimizer(3e-2, 10, warmup_steps=0)
    state = _state(adapters, opt)
    step = make_train_step(module, opt, StepConfig(lora=cfg))
    batch = _batch(config, 1, 4, 16)
    losses = []
    for _ in range(4):
        state, m = step(state, base, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert _tree_equal(base, base_copy)  # the frozen base is untouched
    # Every adapter moved, in every layer.
    assert all(np.abs(np.asarray(a["b"][i])).max() > 0 for a in state["params"].values() for i in range(layers))
    # The optimizer state holds only adapter-shaped moments (no state for the base model).
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim)
    assert n_opt == 2 * lora.count(adapters)
    with pytest.raises(ValueError, match="match no weight"):
        lora.target_names(base, lora.LoraConfig(targets=("wq_a",)))
    # A dotted path selects one stack of weights.
    assert lora.target_names(base, lora.LoraConfig(targets=(r"blocks\.layers\.0\.mlp\.up",))) == [
        "blocks.layers.0.mlp.up.kernel"
    ]


def test_lora_merged_export_equals_base_plus_scaled_ab(tmp_path):
    module, base = _tiny()
    config = module.config
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "o", "up"))
    adapters = lora.init_adapters(base, cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    adapters = {
        n: {"a": a["a"], "b": jnp.asarray(rng.normal(size=a["b"].shape), jnp.float32)} for n, a in adapters.items()
    }
    lora.export_merged(tmp_path / "merged", base, adapters, cfg, config)
    merged = orbax_io.restore_params(tmp_path / "merged")["blocks"]["layers"][0]  # the plain model tree
    stack = "blocks.layers.0."
    r = cfg.rank
    for i in range(config.num_layers):  # each stacked layer has its own adapter
        a = {n: np.asarray(adapters[f"{stack}{n}.kernel"]["a"][i]) for n in ("attn.q", "attn.o", "mlp.up")}
        b = {n: np.asarray(adapters[f"{stack}{n}.kernel"]["b"][i]) for n in ("attn.q", "attn.o", "mlp.up")}
        w = {n: np.asarray(_param(base, f"{stack}{n}.kernel"))[i] for n in ("attn.q", "attn.o", "mlp.up", "attn.k")}
        want_q = w["attn.q"] + 2.0 * np.einsum("dr,rhk->dhk", a["attn.q"], b["attn.q"].reshape(r, 4, 16))
        want_o = w["attn.o"] + 2.0 * np.einsum("hkr,rd->hkd", a["attn.o"].reshape(4, 16, r), b["attn.o"])
        want_up = w["mlp.up"] + 2.0 * a["mlp.up"] @ b["mlp.up"]
        np.testing.assert_allclose(np.asarray(merged["attn"]["q"]["kernel"][i]), want_q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(merged["attn"]["o"]["kernel"][i]), want_o, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(merged["mlp"]["up"]["kernel"][i]), want_up, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(merged["attn"]["k"]["kernel"][i]), w["attn.k"])
    # The export is a normal model directory whose logits are those of the adapted model.
    model = vj.load(tmp_path / "merged")
    tokens = jnp.asarray([[5, 9, 200, 31, 7]], jnp.int32)
    want = models.apply(_graphdef(module), lora.merge(base, adapters, cfg), tokens).logits
    np.testing.assert_allclose(np.asarray(model.logits(tokens)), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_lora_on_the_moe_families(tmp_path):
    # DeepSeek-V3: the default targets reach MLA's low-rank projections, the dense MLP, the shared
    # expert and the routed expert stacks; every delta has its weight's shape.
    ds_module, ds_params = _tiny("deepseek-v3-tiny")
    ds = ds_module.config
    names = lora.target_names(ds_params, lora.LoraConfig())
    leaves = {n.rsplit(".", 2)[1] for n in names}
    assert {"wq_a", "wq_b", "wkv_a", "wo", "gate", "up", "down"} <= leaves
    assert {DS_EXPERTS + ".gate.kernel", DS_SHARED + ".down.kernel", DS_MTP_EXPERTS + ".up.kernel"} <= set(names)
    adapters = lora.init_adapters(ds_params, lora.LoraConfig(rank=2), jax.random.key(1))
    # One adapter per (stacked MoE layer, expert).
    moe_layers = ds.num_layers - ds.num_dense_layers
    chex.assert_shape(adapters[DS_EXPERTS + ".gate.kernel"]["a"], (moe_layers, ds.num_experts, ds.d_model, 2))
    merged = lora.merge(ds_params, jax.tree_util.tree_map(jnp.ones_like, adapters), lora.LoraConfig(rank=2))
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, ds_params)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(ds_params)

    # Grok-1: adapters on attention and the expert stacks train through the MoE dispatch, the
    # base stays frozen, and the merged export's logits are the adapted model's.
    module, base = _tiny("grok-1-tiny", num_layers=2)
    config = module.config
    cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "o", "gate", "down"))
    opt = make_optimizer(3e-2, 10, warmup_steps=0)
    state = _state(lora.init_adapters(base, cfg, jax.random.key(1)), opt)
    step = make_train_step(module, opt, StepConfig(lora=cfg))
    batch = _batch(config, 1, 4, 16)
    losses = []
    for _ in range(3):
        state, m = step(state, base, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses
    assert np.abs(np.asarray(state["params"]["layers.experts.gate.kernel"]["b"][1])).max() > 0  # layer 1's experts
    lora.export_merged(tmp_path / "grok-ft", base, state["params"], cfg, config)
    tokens = jnp.asarray([[5, 9, 200, 31, 7]], jnp.int32)
    graphdef = _graphdef(module)
    logits = jax.jit(lambda p: models.apply(graphdef, p, tokens).logits)
    want = logits(lora.merge(base, state["params"], cfg))
    got = vj.load(tmp_path / "grok-ft").logits(tokens)  # a normal model directory
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _quantized_grok(num_layers: int = 2):
    """grok-1-tiny with the release's weight-only int8 (attention and expert kernels, per output
    channel), quantized from the random float model of `_tiny` (an int8 build has zero kernels)."""
    _, dense = _tiny("grok-1-tiny", num_layers=num_layers)
    module = models.build(get_config("grok-1-tiny", num_layers=num_layers, quantization="int8"), rngs=nnx.Rngs(0))
    return module, quantize_params(dense, nnx.state(module, nnx.Param), Quantization("int8"))


def test_lora_on_int8_and_stacked_expert_weights():
    # Expert stacks [L, E, d, f] get one adapter per layer and expert; int8 weights stay int8 and frozen.
    _, dense = _tiny("grok-1-tiny", num_layers=2)
    module, qparams = _quantized_grok(2)
    c = module.config
    L, e, d, f, r = 2, c.num_experts, c.d_model, c.moe_ffn_dim, 2
    cfg = lora.LoraConfig(rank=r, alpha=4.0, targets=("gate", "down"))
    rng = np.random.default_rng(0)
    for params in (dense, qparams):
        adapters = lora.init_adapters(params, cfg, jax.random.key(0))
        chex.assert_shape(adapters["layers.experts.gate.kernel"]["a"], (L, e, d, r))
        chex.assert_shape(adapters["layers.experts.gate.kernel"]["b"], (L, e, r, f))
        adapters = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)
        merged = lora.merge(params, adapters, cfg)
        ag, bg = (np.asarray(adapters["layers.experts.gate.kernel"][k]) for k in "ab")
        want = np.asarray(_param(dense, "layers.experts.gate.kernel"), np.float32)
        if params is qparams:
            kernel, scale = (
                np.asarray(_param(qparams, f"layers.experts.gate.{k}"), np.float32) for k in ("kernel", "kernel_scale")
            )
            want = (kernel * scale).swapaxes(-1, -2)  # quantized experts are stored K-major
            # Merged, the kernel is the dense weight: its scales become ones (the module is unchanged).
            np.testing.assert_array_equal(np.asarray(_param(merged, "layers.experts.gate.kernel_scale")), 1.0)
            chex.assert_trees_all_equal(
                _param(merged, "layers.experts.up.kernel"), _param(qparams, "layers.experts.up.kernel")
            )
        merged_gate = np.asarray(_param(merged, "layers.experts.gate.kernel"))
        np.testing.assert_allclose(
            merged_gate.swapaxes(-1, -2) if params is qparams else merged_gate,
            want + 2.0 * np.einsum("ledr,lerf->ledf", ag, bg),
            rtol=1e-5,
            atol=1e-5,
        )
    # Gradients reach the adapters through the merged int8 weight; the int8 leaf has no gradient.
    grads = jax.grad(lambda ad: jnp.sum(_param(lora.merge(qparams, ad, cfg), "layers.experts.down.kernel") ** 2))(
        adapters
    )
    assert np.abs(np.asarray(grads["layers.experts.down.kernel"]["b"])).max() > 0


def test_lora_fine_tunes_an_int8_checkpoint(tmp_path):
    module, base = _quantized_grok(2)
    orbax_io.save_params(tmp_path / "int8", base, module.config)
    with pytest.raises(ValueError, match="quantized"):
        train(TrainConfig(model=str(tmp_path / "int8"), steps=1, batch_size=2, seq_len=16), log=_quiet)
    tc = TrainConfig(
        model=str(tmp_path / "int8"),
        steps=3,
        batch_size=2,
        seq_len=16,
        lr=1e-2,
        warmup_steps=0,
        lora_rank=2,
        lora_targets=("q", "down"),
        export=str(tmp_path / "ft"),
    )
    history = train(tc, log=_quiet)
    assert np.isfinite([h["loss"] for h in history]).all()
    exported = orbax_io.restore_params(tmp_path / "ft")["layers"]
    assert exported["experts"]["down"]["kernel"].dtype == jnp.bfloat16  # merged, so dense (unit scales)
    np.testing.assert_array_equal(np.asarray(exported["experts"]["down"]["kernel_scale"]), 1.0)
    assert exported["experts"]["up"]["kernel"].dtype == jnp.int8  # not adapted: still int8
    assert np.isfinite(np.asarray(vj.load(tmp_path / "ft").logits([[5, 6, 7]]))).all()


# -- data and accounting ------------------------------------------------------------------------------
def test_token_files_are_memory_mapped_and_rows_split_the_global_batch(tmp_path):
    ids = np.arange(1000, dtype=np.uint32) % 700
    ids.tofile(tmp_path / "tokens.bin")
    np.save(tmp_path / "tokens.npy", ids.astype(np.uint16))
    raw = data.load_tokens(tmp_path / "tokens.bin", "uint32")
    npy = data.load_tokens(tmp_path / "tokens.npy")
    assert isinstance(raw, np.memmap) and isinstance(npy, np.memmap)
    np.testing.assert_array_equal(raw, npy)
    full = data.batch_at(raw, 7, 8, 16, seed=3)
    np.testing.assert_array_equal(data.batch_at(raw, 7, 8, 16, seed=3, rows=np.array([2, 3, 6])), full[[2, 3, 6]])
    with pytest.raises(ValueError, match="multiple"):
        (tmp_path / "odd.bin").write_bytes(b"abc")
        data.load_tokens(tmp_path / "odd.bin", "uint16")
    assert data.load_tokens("shakespeare").dtype == np.uint8


def test_model_flops_count_only_the_routed_experts():
    module, p = _tiny()
    config = module.config
    d, h, kh, hd, f, v, n = 64, 4, 1, 16, 128, 256, 2
    assert metrics.active_matmul_params(p, config) == n * (d * h * hd * 2 + 2 * d * kh * hd + 3 * d * f) + v * d
    grok = get_config("grok-1-tiny")
    shapes = nnx.state(models.abstract(grok), nnx.Param)  # accounting needs no memory
    dense = metrics.active_matmul_params(shapes, grok)
    sizes = {lora.leaf_name(path): float(np.prod(x.get_value().shape)) for path, x in nnx.to_flat_state(shapes)}
    experts = sum(size for name, size in sizes.items() if ".experts." in name)
    # Everything but the embedding lookup and the norm scales [layers, d] is a matmul weight.
    everything = sum(
        size for name, size in sizes.items() if name != "embed.embedding" and not name.endswith("norm.scale")
    )
    assert dense == pytest.approx(everything - experts * (1 - 2 / 4) + grok.vocab_size * grok.d_model)
    # Sliding layers see at most `window` keys: gemma2-tiny's alternate layers cost less attention.
    g2 = get_config("gemma2-tiny")
    full = 2 * g2.num_heads * 2 * g2.head_dim * (64 + 1) / 2
    windowed = 2 * g2.num_heads * 2 * g2.head_dim * np.minimum(np.arange(1, 65), 8).mean()
    assert metrics.attention_flops_per_token(g2, 64) == pytest.approx(2 * full + 2 * windowed)


# -- DeepSeek-V3: MTP and aux-loss-free balancing ------------------------------------------------------
def test_deepseek_trains_with_mtp_and_router_bias_balancing():
    module, params = _tiny("deepseek-v3-tiny")
    config = module.config
    assert module.capabilities.mtp and module.capabilities.moe
    graphdef = _graphdef(module)
    batch = _batch(config, 1, 2, 12)

    def sums_and_mtp_loss(p):
        model = nnx.merge(graphdef, p)
        return loss_sums(model, batch[0], depths=config.num_mtp_layers), model.mtp_loss(batch[0])

    sums, mtp_loss = jax.jit(sums_and_mtp_loss)(params)
    # Our sums over every target the batch holds = the model file's mean MTP loss.
    mtp_mean = float(sums["mtp"][0]) / (2 * (12 - 1))
    np.testing.assert_allclose(mtp_mean, float(mtp_loss), rtol=1e-5)
    gamma = 0.01
    opt = make_optimizer(3e-3, 10, warmup_steps=0, frozen=frozen_from_gradients)
    # Trained with activation checkpointing: each stack (dense prefix, MoE layers) is one
    # checkpointed region, inside its scan when it has more layers than scan_unroll (a one-layer
    # stack runs straight-line), and each MTP depth's block is one more.
    rematted, _ = _tiny("deepseek-v3-tiny", remat_policy="full")
    step = make_train_step(rematted, opt, StepConfig(mtp_weight=0.3, router_bias_rate=gamma))
    state0 = _state(params, opt)
    depths = [config.num_dense_layers, config.num_layers - config.num_dense_layers]
    assert depths == [1, 2] and config.scan_unroll == 1
    assert _remat_regions(step, state0, None, batch) == (1, 1 + config.num_mtp_layers)
    state, m = step(state0, None, batch)
    assert {"mtp", "load_imbalance"} <= set(m)
    # The biases moved by exactly ±γ (sign of mean load - load), from zero: not by gradients.
    counts = np.asarray(sums["expert_counts"], np.float32)
    want = gamma * np.sign(counts.mean(axis=-1, keepdims=True) - counts)
    np.testing.assert_allclose(np.asarray(_param(state["params"], DS_ROUTER_BIAS)), want, atol=1e-7)
    mtp_counts = np.asarray(sums["mtp_expert_counts"], np.float32)
    np.testing.assert_allclose(
        np.asarray(_param(state["params"], DS_MTP_ROUTER_BIAS)),
        gamma * np.sign(mtp_counts.mean(axis=-1, keepdims=True) - mtp_counts),
        atol=1e-7,
    )
    losses = [float(m["loss"])]
    for _ in range(2):
        state, m = step(state, None, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses


def test_grok_trains():
    module, params = _tiny("grok-1-tiny", num_layers=2)
    opt = make_optimizer(1e-2, 10, warmup_steps=0)
    step = make_train_step(module, opt, StepConfig(compute_dtype=jnp.bfloat16))
    state = _state(params, opt)
    batch = _batch(module.config, 1, 4, 16)
    losses = []
    for _ in range(3):
        state, m = step(state, None, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses
    assert _param(state["params"], "layers.experts.gate.kernel").dtype == jnp.float32
    assert "load_imbalance" in m  # Grok-1 reports its expert loads too


# -- sharding ---------------------------------------------------------------------------------------------
_BIG_WEIGHT = {"gemma-tiny": "blocks.layers.0.mlp.up.kernel", "grok-1-tiny": "layers.experts.up.kernel"}


@pytest.mark.parametrize(
    "name,mesh_sizes,rules_name",
    [
        ("gemma-tiny", dict(fsdp=4, tensor=2), "fsdp"),
        ("grok-1-tiny", dict(fsdp=2, expert=4), "expert"),
        ("deepseek-v3-tiny", dict(fsdp=2, expert=4), "expert"),  # + MTP loss and the router-bias update
    ],
)
def test_sharded_train_step_equals_unsharded(name, mesh_sizes, rules_name):
    from vishwam_jax.sharding import RULES, make_mesh, use_mesh
    from vishwam_jax.training import placement

    module, params = _tiny(name, num_layers=2)
    config = module.config
    # _smooth_adamw, with DeepSeek-V3's router biases left to the balancing rule (no Adam state).
    opt = make_optimizer(1e-2, 10, warmup_steps=0, eps=1.0, frozen=frozen_from_gradients)
    batch = _batch(config, 2, 8, 16)
    cfg = StepConfig(mtp_weight=0.3, router_bias_rate=0.01) if name.startswith("deepseek") else StepConfig()
    want_state, want = make_train_step(module, opt, cfg)(_state(params, opt), None, batch)

    mesh, rules = make_mesh(**mesh_sizes), RULES[rules_name]
    # From the parameters' own logical axes; Adam's moments follow.
    p_sh = placement.model_shardings(params, mesh, rules, config)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    s_sh = placement.state_shardings(p_sh, shapes, opt, mesh)
    with use_mesh(mesh, rules):
        state = jax.jit(lambda p: init_state(p, opt), out_shardings=s_sh)(jax.device_put(params, p_sh))
        step = make_train_step(module, opt, cfg, state_shardings=s_sh, metrics_sharding=placement.replicated(mesh))
        sharded_batch = jax.device_put(batch, placement.batch_sharding(mesh, rules, 8))
        if "expert" in mesh_sizes:  # tokens really travel to their experts' devices
            assert "all_to_all" in str(jax.make_jaxpr(step)(state, None, sharded_batch))
        got_state, got = step(state, None, sharded_batch)
    # Really sharded: the big weights are split over all 8 devices, and Adam's moments follow them.
    path = _BIG_WEIGHT.get(name, DS_EXPERTS + ".up.kernel")
    weight = _param(got_state["params"], path)
    assert len(weight.addressable_shards) == 8 and weight.addressable_shards[0].data.size == weight.size // 8
    moments = [
        x.mu
        for x in jax.tree_util.tree_leaves(got_state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(x, "mu")
    ]
    assert moments and _param(moments[0], path).sharding == weight.sharding
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, err_msg=k)
    chex.assert_trees_all_close(got_state["params"], want_state["params"], rtol=1e-4, atol=1e-5)


def test_unwritable_workdir_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess

    (tmp_path / "a_file").write_text("")
    workdirs = [tmp_path / "a_file" / "run"]  # unwritable for every user, root included
    if os.geteuid() != 0:  # root writes into read-only directories
        (tmp_path / "read_only").mkdir(mode=0o555)
        workdirs.append(tmp_path / "read_only" / "run")
    for workdir in workdirs:
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "train.py"),
                "--model",
                "gemma-tiny",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--workdir",
                str(workdir),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert r.stderr.strip() == r.stderr.strip().splitlines()[0], r.stderr[-2000:]
        assert f"workdir {workdir} is not writable" in r.stderr, r.stderr
