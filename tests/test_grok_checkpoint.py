"""Grok-1 checkpoints: a tiny checkpoint written in the exact release format (pickled leaves in
lexicographic module order, QuantizedWeight8bit int8 + scales, row-parallel block scales, 12 layers)
from a random model, converted both ways (dequantized; kept int8) and compared with the model on the
original float weights; the leaf order; refusals of malformed or unsafe inputs; the HF-format ports;
a converted directory carrying the release's SentencePiece tokenizer."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from grok_utils import NORMS, jit_forward, layer, module, random_params, tiny_config

import vishwam_jax as vj
from vishwam_jax import models, quantization
from vishwam_jax.checkpoint import grok_release, hf_grok, orbax_io
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError
from vishwam_jax.presets import get_config

generate_cli = importlib.import_module("vishwam_jax.generate")
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "grok1-tokenizer.model"
ROW_BLOCKS = 2  # the release stores one row of scales per tensor-parallel shard of the input axis


@dataclasses.dataclass
class QuantizedWeight8bit:
    """The release's class, as its pickles name it (`__main__.QuantizedWeight8bit`)."""

    weight: np.ndarray
    scales: np.ndarray


QuantizedWeight8bit.__module__ = "__main__"


def quantize(w: np.ndarray, in_axis: int, blocks: int = 1) -> QuantizedWeight8bit:
    """Symmetric int8, one bfloat16 scale per output channel and per block of input rows."""
    shape = w.shape
    split = shape[:in_axis] + (blocks, shape[in_axis] // blocks) + shape[in_axis + 1 :]
    wb = w.reshape(split)
    amax = np.abs(wb).max(axis=in_axis + 1, keepdims=True)
    scales = (amax / 127.0).astype(ml_dtypes.bfloat16)
    q = np.clip(np.rint(wb / scales.astype(np.float32)), -127, 127).astype(np.int8).reshape(shape)
    return QuantizedWeight8bit(q, np.squeeze(scales, axis=in_axis + 1))


def dequantize(q: QuantizedWeight8bit, in_axis: int) -> np.ndarray:
    """dense = weight * scales, each scale row covering its block of input rows."""
    reps = q.weight.shape[in_axis] // q.scales.shape[in_axis]
    return q.weight.astype(np.float32) * np.repeat(q.scales.astype(np.float32), reps, axis=in_axis)


RELEASE_NORMS = dict(zip(NORMS, ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3")))


def release_tree(params: dict, c) -> dict:
    """Our parameters as the release's Haiku dict {module path: {param name: leaf}}: linear weights
    flattened over heads, attention and expert matrices int8 (row-parallel ones in blocks)."""
    d, h, kh, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    tree = {
        "language_model/in_out_embed": {"embeddings": params["embed"]["embedding"]},
        "language_model/rms_norm": {"scale": params["final_norm"]["scale"]},
    }
    for n in range(c.num_layers):
        L = layer(params, n)
        attn, experts = ({k: w["kernel"] for k, w in L[group].items()} for group in ("attn", "experts"))
        p = f"transformer/decoder_layer_{n}/"
        tree[p + "multi_head_attention/query"] = {"w": quantize(attn["q"].reshape(d, h * hd), 0)}
        tree[p + "multi_head_attention/key"] = {"w": quantize(attn["k"].reshape(d, kh * hd), 0)}
        tree[p + "multi_head_attention/value"] = {"w": quantize(attn["v"].reshape(d, kh * hd), 0)}
        tree[p + "multi_head_attention/linear"] = {"w": quantize(attn["o"].reshape(h * hd, d), 0, ROW_BLOCKS)}
        tree[p + "moe/linear"] = {"w": quantize(experts["gate"], 1)}
        tree[p + "moe/linear_v"] = {"w": quantize(experts["up"], 1)}
        tree[p + "moe/linear_1"] = {"w": quantize(experts["down"], 1, ROW_BLOCKS)}
        tree[p + "router"] = {"w": L["router"]["kernel"]}
        for ours, theirs in RELEASE_NORMS.items():
            tree[p + theirs] = {"scale": L[ours]["scale"]}
    return tree


def dequantized_params(tree: dict, c) -> dict:
    """What the dequantizing converter must produce, computed here from the release tree (our
    module's pure dict: every layer stacked on the leading axis)."""
    d, h, kh, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    layers = []
    for n in range(c.num_layers):
        g = lambda m: tree[f"transformer/decoder_layer_{n}/{m}"]
        attn = {
            "q": dequantize(g("multi_head_attention/query")["w"], 0).reshape(d, h, hd),
            "k": dequantize(g("multi_head_attention/key")["w"], 0).reshape(d, kh, hd),
            "v": dequantize(g("multi_head_attention/value")["w"], 0).reshape(d, kh, hd),
            "o": dequantize(g("multi_head_attention/linear")["w"], 0).reshape(h, hd, d),
        }
        experts = {
            k: dequantize(g(m)["w"], 1)
            for k, m in (("gate", "moe/linear"), ("up", "moe/linear_v"), ("down", "moe/linear_1"))
        }
        layers.append(
            {
                **{ours: {"scale": g(theirs)["scale"]} for ours, theirs in RELEASE_NORMS.items()},
                "attn": {k: {"kernel": w} for k, w in attn.items()},
                "router": {"kernel": g("router")["w"]},
                "experts": {k: {"kernel": w} for k, w in experts.items()},
            }
        )
    return {
        "embed": {"embedding": tree["language_model/in_out_embed"]["embeddings"]},
        "final_norm": {"scale": tree["language_model/rms_norm"]["scale"]},
        "layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers),
    }


def write_release(root: Path, tree: dict, protocol: int = 4) -> Path:
    """ckpt-0/tensor{i:05d}_000, leaf i of jax.tree_util's flattening of the Haiku dict (sorted module
    paths), each pickled alone as the release's checkpoint.py does."""
    ckpt = root / "ckpt-0"
    ckpt.mkdir(parents=True)
    main = sys.modules["__main__"]
    setattr(main, "QuantizedWeight8bit", QuantizedWeight8bit)  # pickle looks the class up by name
    try:
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):  # a plain dataclass is a leaf
            with open(ckpt / f"tensor{i:05d}_000", "wb") as f:
                pickle.dump(leaf, f, protocol=protocol)
    finally:
        delattr(main, "QuantizedWeight8bit")  # the converter must not rely on it
    return ckpt


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    c = tiny_config()  # 12 layers: lexicographic order differs from numeric
    params = random_params(c, seed=7, q_gain=3.0)
    tree = release_tree(params, c)
    root = tmp_path_factory.mktemp("grok-release")
    write_release(root, tree)
    return c, params, tree, root


@pytest.fixture(scope="module")
def forward(release):
    return jit_forward(release[0])


TOKENS = np.array([[0, 3, 77, 120, 5, 300, 9, 41, 11], [64, 65, 66, 0, 200, 201, 1, 2, 100]])


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_release_fixture_has_the_release_layout(release):
    c, _, _, root = release
    names = sorted(p.name for p in (root / "ckpt-0").iterdir())
    assert len(names) == 2 + 12 * c.num_layers == 146
    assert names[0] == "tensor00000_000" and names[-1] == "tensor00145_000"
    assert grok_release.detect(root) and grok_release.detect(root / "ckpt-0")


def test_dequantized_conversion_is_exact(release, forward, tmp_path):
    """Converted weights are exactly the release's int8 weights times their (block) scales, each in
    its place: the 12-layer model reproduces the logits of those weights."""
    c, params, tree, root = release
    dst = tmp_path / "model"
    vj.convert(root, dst, config="grok-1-tiny", dtype=np.float32)  # auto-detected as the release
    model = vj.load(dst, dtype=np.float32)
    assert (
        _rel_err(forward(model.params, jnp.asarray(TOKENS)), forward(dequantized_params(tree, c), jnp.asarray(TOKENS)))
        < 1e-5
    )


def test_fp8_conversion_and_fp8_at_load_store_the_same_k_major_experts(release, tmp_path):
    """The checkpoint writer (quantizing the float kernels converters hand it, then laying the experts
    out K-major) and quantizing a float model at load store the same bytes: expert values [L, e, out,
    in], their block scales [L, e, out blocks, in blocks]."""
    c, _, _, root = release
    vj.convert(root, tmp_path / "f32", config="grok-1-tiny", dtype=np.float32)
    vj.convert(root, tmp_path / "fp8", config="grok-1-tiny", quantize="fp8")
    block = tuple(orbax_io.read_config(tmp_path / "fp8").quantization_block)
    converted = nnx.to_pure_dict(vj.load(tmp_path / "fp8").params)["layers"]["experts"]
    float_model = vj.load(tmp_path / "f32", dtype=np.float32)
    at_load = nnx.to_pure_dict(vj.load(tmp_path / "f32", quantize="fp8").params)["layers"]["experts"]
    gate = converted["gate"]
    assert gate["kernel"].shape == (c.num_layers, c.num_experts, c.moe_ffn_dim, c.d_model)  # K-major
    assert gate["kernel_scale"].shape == (
        c.num_layers,
        c.num_experts,
        -(-c.moe_ffn_dim // block[1]),
        -(-c.d_model // block[0]),
    )
    for name in ("gate", "up", "down"):
        for leaf in ("kernel", "kernel_scale"):
            a, b = np.asarray(converted[name][leaf]), np.asarray(at_load[name][leaf])
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, leaf)
    # And they are the float model's experts: dequantized back to [L, e, in, out], within fp8's rounding.
    float_gate = np.asarray(nnx.to_pure_dict(float_model.params)["layers"]["experts"]["gate"]["kernel"])
    back = quantization.dequantize(
        gate["kernel"], gate["kernel_scale"], "fp8", (1, 1), block, jnp.float32, k_major=True
    )
    assert np.max(np.abs(np.asarray(back) - float_gate)) <= 0.04 * np.max(np.abs(float_gate))


def test_default_storage_is_bfloat16_for_dequantized_weights(release, tmp_path):
    _, _, _, root = release
    grok_release.convert(root, tmp_path / "m", config="grok-1-tiny")
    shapes = orbax_io.param_shapes(tmp_path / "m")
    layers = shapes["layers"]  # every layer stacked on the leading axis
    assert layers["experts"]["down"]["kernel"].dtype == jnp.bfloat16  # dequantized int8
    chex.assert_shape(layers["attn"]["q"]["kernel"], (12, 32, 4, 8))
    assert (
        shapes["embed"]["embedding"].dtype == np.float32 and layers["router"]["kernel"].dtype == np.float32
    )  # plain leaves as stored
    config = orbax_io.read_config(tmp_path / "m")
    assert config.family == "grok1" and config.quantization == "none" and config.tokenizer == "sentencepiece"


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m vishwam_jax.convert ...` in a subprocess, as a user runs it (importing that module
    here would replace the package's `convert` function with the module of the same name)."""
    return subprocess.run(
        [sys.executable, "-m", "vishwam_jax.convert", *args], capture_output=True, text=True, timeout=300
    )


def _dense(w, k_major: bool = False) -> np.ndarray:
    """The float kernel of int8 values and scales, in the float layout (quantized experts are stored
    K-major, [..., N, K])."""
    dense = np.asarray(w["kernel"], np.float32) * np.asarray(w["kernel_scale"], np.float32)
    return dense.swapaxes(-1, -2) if k_major else dense


def test_quantize_int8_runs_weight_only_int8(release, forward, tmp_path):
    c, params, tree, root = release
    dst = tmp_path / "int8"
    vj.convert(root, dst, config={"preset": "grok-1-tiny"}, quantize="int8")
    assert orbax_io.read_config(dst).quantization == "int8"  # the model is built with int8 weights
    layers = orbax_io.param_shapes(dst)["layers"]  # [12, ...]: every layer stacked
    assert layers["attn"]["q"]["kernel"].dtype == np.int8
    assert layers["attn"]["q"]["kernel_scale"].shape == (12, 1, 4, 8)
    assert layers["attn"]["o"]["kernel_scale"].shape == (12, 1, 1, 32)
    assert layers["experts"]["down"]["kernel"].shape == (12, 4, 32, 48)  # K-major: [L, e, d, f]
    assert layers["experts"]["down"]["kernel_scale"].shape == (12, 4, 32, 1)
    model = vj.load(dst, dtype=np.float32)
    loaded = nnx.to_pure_dict(model.params)
    assert loaded["layers"]["experts"]["gate"]["kernel"].dtype == jnp.int8  # loaded as int8, not dequantized
    expected = dequantized_params(tree, c)
    for n in (2, 10):
        got, want = layer(loaded, n), layer(expected, n)
        # Per-output-channel scales (q, k, v, gate, up): the release's int8 values, bit for bit.
        release_q = tree[f"transformer/decoder_layer_{n}/multi_head_attention/query"]["w"].weight
        np.testing.assert_array_equal(np.asarray(got["attn"]["q"]["kernel"]).reshape(32, 32), release_q)
        gate = _dense(got["experts"]["gate"], k_major=True)
        np.testing.assert_allclose(gate, want["experts"]["gate"]["kernel"], rtol=1e-6, atol=0)
        # Block scales along the input (o, down) are requantized per output channel: within half a step.
        for w, dense, k_major in (
            (got["attn"]["o"], want["attn"]["o"]["kernel"], False),
            (got["experts"]["down"], want["experts"]["down"]["kernel"], True),
        ):
            step = np.asarray(w["kernel_scale"], np.float32)
            step = step.swapaxes(-1, -2) if k_major else step
            assert np.all(np.abs(_dense(w, k_major) - dense) <= 0.5 * step * (1 + 1e-5))
    # The int8 matmuls compute what their dequantized weights compute (the float model's tree).
    as_float = jax.tree_util.tree_map(lambda x: x, loaded)
    for group in ("attn", "experts"):
        as_float["layers"][group] = {
            k: {"kernel": _dense(w, k_major=group == "experts")} for k, w in loaded["layers"][group].items()
        }
    assert _rel_err(model.logits(TOKENS), forward(as_float, jnp.asarray(TOKENS))) < 1e-4


@pytest.mark.parametrize("int8", [False, True])
def test_int8_error_against_the_original_float_model(int8, tmp_path):
    """Quantization error of a shallow model stays bounded in both modes. (Deeper random MoE models
    amplify any perturbation, a routing flip being discontinuous, so the bound is taken at 2 layers;
    the 12-layer fixture above checks exactness instead.)"""
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=11)
    write_release(tmp_path / "src", release_tree(params, c))
    # Through the command line, as a user converts: config overrides in the release's field names.
    config = {"preset": "grok-1-tiny", "num_layers": 2}
    if int8:  # through the command line, as a user converts: overrides in the release's field names
        r = convert_cli(
            str(tmp_path / "src"),
            str(tmp_path / "m"),
            "--config",
            json.dumps(config),
            "--dtype",
            "float32",
            "--quantize",
            "int8",
        )
        assert r.returncode == 0, r.stderr
    else:
        vj.convert(tmp_path / "src", tmp_path / "m", config=config, dtype=np.float32)
    model = vj.load(tmp_path / "m")
    assert model.params["layers"]["experts"]["gate"]["kernel"][...].dtype == (jnp.int8 if int8 else jnp.float32)
    assert _rel_err(model.logits(TOKENS), jit_forward(c)(params, jnp.asarray(TOKENS))) < 0.06
    # Cached generation runs on the int8 weights too.
    prompt = [5, 6, 7, 8]
    out = [int(t) for t in np.asarray(model.generate([prompt], 3))[0]]
    seq = list(prompt)
    for _ in range(3):
        seq.append(int(jnp.argmax(model.logits([seq + [0] * (8 - len(seq))])[0, len(seq) - 1])))
    assert out == seq[len(prompt) :]


def test_weight_only_int8_keeps_no_dequantized_copy(monkeypatch):
    """The int8 forward's scratch memory is far below one bfloat16 copy of its int8 weights: each
    matmul converts its weight inside the product. Dequantizing the weights up front (the thing this
    guards against) needs ~2x that copy in this model. Measured with the reference grouped matmul,
    because XLA:CPU's ragged_dot lowering needs large temporaries of its own, int8 or not."""
    monkeypatch.setenv("VISHWAM_GMM_IMPL", "reference")
    overrides = dict(num_layers=4, d_model=256, moe_ffn_dim=512, num_heads=8, num_kv_heads=2, head_dim=32)
    params = random_params(tiny_config(**overrides), seed=13)
    # Quantized per output channel, the stacked layer (and expert) axes a batch.
    dims = {"o": (2, 1), "gate": (1, 1), "up": (1, 1), "down": (1, 1)}
    for group in ("attn", "experts"):
        for k, w in params["layers"][group].items():
            k_major = group == "experts"  # quantized experts are stored K-major
            q, s = quantization.quantize(np.asarray(w["kernel"]), "int8", dims.get(k, (1, 2)), xp=np, k_major=k_major)
            params["layers"][group][k] = {"kernel": q, "kernel_scale": s}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.int8 if a.dtype == np.int8 else jnp.bfloat16), params)
    int8_bytes = sum(a.size for a in jax.tree_util.tree_leaves(params) if a.dtype == jnp.int8)
    graphdef, state = nnx.split(module(tiny_config(quantization="int8", **overrides), params), nnx.Param)
    step = jax.jit(lambda p, t: models.apply(graphdef, p, t).logits).lower(state, jnp.ones((1, 1), jnp.int32)).compile()
    assert step.memory_analysis().temp_size_in_bytes < 0.5 * (2 * int8_bytes)


def test_convert_cli_help_warns_about_pickles():
    r = convert_cli("--help")
    help_text = " ".join(r.stdout.split())
    assert (
        r.returncode == 0 and "unpickling can run code: convert only checkpoints from a source you trust" in help_text
    )
    assert "--quantize" in help_text and "--config" in help_text


def test_convert_cli_reports_bad_config_fields(release, tmp_path):
    r = convert_cli(str(release[3]), str(tmp_path / "m"), "--config", '{"hidden_size": 32}')
    assert (
        r.returncode == 2 and "unknown Grok-1 config field(s) hidden_size" in r.stderr and "Traceback" not in r.stderr
    )


def test_leaf_order_is_lexicographic():
    plan = grok_release.leaf_plan(get_config("grok-1"))
    assert len(plan) == 770
    names = [leaf.name for leaf in plan]
    assert names[:3] == [
        "language_model/in_out_embed/embeddings",
        "language_model/rms_norm/scale",
        "transformer/decoder_layer_0/moe/linear/w",
    ]
    assert names[2:14] == [
        f"transformer/decoder_layer_0/{m}"
        for m in (
            "moe/linear/w",
            "moe/linear_1/w",
            "moe/linear_v/w",
            "multi_head_attention/key/w",
            "multi_head_attention/linear/w",
            "multi_head_attention/query/w",
            "multi_head_attention/value/w",
            "rms_norm/scale",
            "rms_norm_1/scale",
            "rms_norm_2/scale",
            "rms_norm_3/scale",
            "router/w",
        )
    ]
    # decoder_layer_1, then 10..19, then 2: layer 10 starts at leaf 26, layer 2 at 146, layer 9 ends the file.
    assert names[14].startswith("transformer/decoder_layer_1/") and names[26].startswith(
        "transformer/decoder_layer_10/"
    )
    assert (
        names[146].startswith("transformer/decoder_layer_2/") and names[769] == "transformer/decoder_layer_9/router/w"
    )
    assert (plan[26].dest, plan[26].layer) == (("layers", "experts", "gate", "kernel"), 10)
    assert (plan[3].dest, plan[3].layer) == (("layers", "experts", "down", "kernel"), 0)
    assert (plan[4].dest, plan[4].layer) == (("layers", "experts", "up", "kernel"), 0)
    assert (plan[0].dest, plan[0].layer) == (("embed", "embedding"), None)
    assert (plan[769].dest, plan[769].layer) == (("layers", "router", "kernel"), 9)
    # The same order as jax.tree_util flattening a Haiku-style dict of those module paths.
    haiku = {name.rsplit("/", 1)[0]: {name.rsplit("/", 1)[1]: i} for i, name in enumerate(names)}
    assert jax.tree_util.tree_leaves(haiku) == list(range(770))


def test_numeric_leaf_order_would_be_caught(release, forward, tmp_path):
    """Files written in numeric layer order convert (shapes agree) but do not reproduce the model:
    the fixture's 12 layers make the order observable."""
    c, params, tree, _ = release
    layer_number = lambda path: int(m.group(1)) if (m := re.search(r"decoder_layer_(\d+)/", path)) else -1
    numeric = dict(sorted(tree.items(), key=lambda kv: (layer_number(kv[0]), kv[0])))
    root = tmp_path / "numeric"
    ckpt = root / "ckpt-0"
    ckpt.mkdir(parents=True)
    setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit)
    try:
        for i, leaf in enumerate(v for module in numeric.values() for v in module.values()):
            (ckpt / f"tensor{i:05d}_000").write_bytes(pickle.dumps(leaf, protocol=4))
    finally:
        delattr(sys.modules["__main__"], "QuantizedWeight8bit")
    grok_release.convert(root, tmp_path / "m", config="grok-1-tiny", dtype=np.float32)
    wrong = forward(vj.load(tmp_path / "m").params, jnp.asarray(TOKENS))
    assert _rel_err(wrong, forward(dequantized_params(tree, c), jnp.asarray(TOKENS))) > 0.05


def test_tokenizer_model_is_copied(release, tmp_path):
    _, _, _, root = release
    src = tmp_path / "release"
    shutil.copytree(root, src)
    (src / "tokenizer.model").write_bytes(b"not parsed by the converter")
    grok_release.convert(src / "ckpt-0", tmp_path / "m", config="grok-1-tiny")  # given ckpt-0 itself
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == b"not parsed by the converter"


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} not present")
def test_generation_with_the_release_tokenizer(tmp_path, capsys):
    """A converted directory carries the release's tokenizer.model; text in, text out."""
    overrides = {"preset": "grok-1-tiny", "vocab_size": 131072, "num_layers": 2}
    c = grok_release.resolve_config(overrides)
    write_release(tmp_path / "src", release_tree(random_params(c, seed=8), c))
    shutil.copyfile(TOKENIZER, tmp_path / "src" / "tokenizer.model")
    vj.convert(tmp_path / "src", tmp_path / "m", config=overrides)
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    tokenizer = vj.load(tmp_path / "m").tokenizer
    ids = tokenizer.encode("The answer to life the universe and everything is")
    assert ids[0] == c.bos_token_id and tokenizer.decode(ids[1:]) == "The answer to life the universe and everything is"
    prompt = "The answer to life"
    assert (
        generate_cli.run(
            ["--model", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0"]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith(prompt) and "tok/s" in out.err


# -- refusals -------------------------------------------------------------------------------------
def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_refuses_unexpected_files(release, tmp_path):
    src = _copy(release[3], tmp_path)
    (src / "ckpt-0" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointFormatError, match="unexpected entry 'notes.txt'"):
        grok_release.convert(src, tmp_path / "m", config="grok-1-tiny")
    assert not (tmp_path / "m").exists()


def test_refuses_missing_leaf(release, tmp_path):
    src = _copy(release[3], tmp_path)
    (src / "ckpt-0" / "tensor00005_000").unlink()
    with pytest.raises(CheckpointFormatError, match="missing tensor00005_000"):
        grok_release.convert(src, tmp_path / "m", config="grok-1-tiny")


def test_refuses_other_shards(release, tmp_path):
    src = _copy(release[3], tmp_path)
    (src / "ckpt-0" / "tensor00005_000").rename(src / "ckpt-0" / "tensor00005_001")
    with pytest.raises(CheckpointFormatError, match="shard 001"):
        grok_release.convert(src, tmp_path / "m", config="grok-1-tiny")


def test_refuses_a_config_with_another_depth(release, tmp_path):
    with pytest.raises(CheckpointFormatError, match="holds 146 leaves, the config expects 770"):
        grok_release.convert(release[3], tmp_path / "m")  # default config: the 64-layer grok-1


def test_refuses_wrong_shapes_naming_the_leaf(release, tmp_path):
    config = {"preset": "grok-1-tiny", "emb_size": 48}
    with pytest.raises(
        CheckpointFormatError, match=r"leaf 0 \(language_model/in_out_embed/embeddings.*\(512, 32\).*\(512, 48\)"
    ):
        grok_release.convert(release[3], tmp_path / "m", config=config)
    config = {"preset": "grok-1-tiny", "widening_factor": 4}
    with pytest.raises(
        CheckpointFormatError, match=r"leaf 2 \(transformer/decoder_layer_0/moe/linear/w\).*widening_factor"
    ):
        grok_release.convert(release[3], tmp_path / "m", config=config)


def test_refuses_unknown_config_fields():
    with pytest.raises(ValueError, match="unknown Grok-1 config field.*hidden_size"):
        grok_release.resolve_config({"hidden_size": 6144})
    with pytest.raises(ValueError, match="not Grok-1"):
        grok_release.resolve_config("gemma-tiny")
    with pytest.raises(ValueError, match="num_layers must be a positive integer, not 2.5"):
        grok_release.resolve_config({"num_layers": 2.5})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        grok_release.resolve_config({"num_kv_heads": 5})
    c = grok_release.resolve_config('{"num_layers": 2, "emb_size": 1024, "widening_factor": 4}')
    assert (c.num_layers, c.d_model, c.moe_ffn_dim, c.num_heads) == (2, 1024, 2736, 48)
    c = grok_release.resolve_config(
        {"preset": "grok-1-tiny", "num_q_heads": 8, "key_size": 4, "num_selected_experts": 3}
    )
    assert (c.num_heads, c.head_dim, c.num_experts_per_token) == (8, 4, 3)  # the release's names, mapped
    with pytest.raises(AttributeError):  # validated and frozen
        c.num_layers = 3


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_refuses_code_in_pickles_without_running_it(release, tmp_path):
    src = _copy(release[3], tmp_path)
    marker = tmp_path / "pwned"
    (src / "ckpt-0" / "tensor00001_000").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointFormatError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        grok_release.convert(src, tmp_path / "m", config="grok-1-tiny")
    assert not marker.exists()


def test_refuses_objects_other_than_arrays(release, tmp_path):
    src = _copy(release[3], tmp_path)
    (src / "ckpt-0" / "tensor00001_000").write_bytes(pickle.dumps({"scale": [1.0] * 32}))
    with pytest.raises(CheckpointFormatError, match="tensor00001_000 is a dict, not a numpy array"):
        grok_release.convert(src, tmp_path / "m", config="grok-1-tiny")


def test_reads_protocol_5_and_bfloat16_leaves(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    (tmp_path / "leaf").write_bytes(pickle.dumps(a, protocol=5))
    np.testing.assert_array_equal(grok_release.read_leaf(tmp_path / "leaf"), a)


def test_block_scales_must_tile_the_weight():
    leaf = grok_release.leaf_plan(get_config("grok-1-tiny"))[6]  # attention output [32, 32]
    assert grok_release.block_scales(leaf, np.ones((4, 32), np.float32)).shape == (4, 32)
    assert grok_release.block_scales(leaf, np.ones((32,), np.float32)).shape == (1, 32)
    with pytest.raises(CheckpointFormatError, match=r"leaf 6 .*scales \(3, 32\) neither broadcast against nor tile"):
        grok_release.block_scales(leaf, np.ones((3, 32), np.float32))


def test_detect_ignores_other_directories(tmp_path):
    assert not grok_release.detect(tmp_path)
    (tmp_path / "ckpt-0").mkdir()
    (tmp_path / "ckpt-0" / "model.safetensors").write_bytes(b"")
    assert not grok_release.detect(tmp_path)


# -- HF-format ports ------------------------------------------------------------------------------
def write_hf_port(
    root: Path, params: dict, c, layout: str, lm_head: np.ndarray | None = None, fmt: str = "safetensors"
) -> None:
    from safetensors.numpy import save_file

    names = hf_grok.LAYOUTS[layout]
    d, h, kh, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    t = {names["embed"]: params["embed"]["embedding"], names["final_norm"]: params["final_norm"]["scale"]}
    for i in range(c.num_layers):
        L = layer(params, i)
        n = lambda key, **kw: names[key].format(i=i, **kw)
        for key in NORMS:
            t[n(key)] = L[key]["scale"]
        t[n("q")] = L["attn"]["q"]["kernel"].reshape(d, h * hd).T  # PyTorch: [out, in]
        t[n("k")] = L["attn"]["k"]["kernel"].reshape(d, kh * hd).T
        t[n("v")] = L["attn"]["v"]["kernel"].reshape(d, kh * hd).T
        t[n("o")] = L["attn"]["o"]["kernel"].reshape(h * hd, d).T
        t[n("router")] = L["router"]["kernel"].T
        for e in range(c.num_experts):
            for key in ("gate", "up", "down"):
                t[n(key, e=e)] = L["experts"][key]["kernel"][e].T
    if lm_head is not None:
        t["lm_head.weight"] = lm_head
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(root / "model.safetensors"))
    else:  # as both ports were published: bfloat16 torch.save shards and a weight map
        import torch

        names = sorted(t)
        shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
        for file, keys in shards.items():
            torch.save(
                {k: torch.from_numpy(np.ascontiguousarray(t[k], np.float32)).to(torch.bfloat16) for k in keys},
                root / file,
            )
        index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
        (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    hf = {
        "architectures": ["Grok1ModelForCausalLM" if layout == "hpcai" else "GrokForCausalLM"],
        "model_type": "grok-1" if layout == "hpcai" else "grok",
        "vocab_size": c.vocab_size,
        "hidden_size": d,
        "intermediate_size": c.moe_ffn_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": h,
        "num_key_value_heads": kh,
        "head_dim": hd,
        "num_experts": c.num_experts,
        "num_experts_per_tok": 2,
        "max_position_embeddings": c.max_seq_len,
        "embedding_multiplier_scale": c.embedding_multiplier_scale,
        "output_multiplier_scale": c.output_multiplier_scale,
        "attn_output_multiplier": c.attn_output_multiplier,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (root / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("layout", sorted(hf_grok.LAYOUTS))
def test_hf_ports_convert_exactly(layout, tmp_path):
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=9, q_gain=3.0)
    write_hf_port(
        tmp_path / "hf", params, c, layout, lm_head=params["embed"]["embedding"] if layout == "hpcai" else None
    )
    assert hf_grok.detect(tmp_path / "hf") and not grok_release.detect(tmp_path / "hf")
    vj.convert(tmp_path / "hf", tmp_path / "m")
    model = vj.load(tmp_path / "m")
    for field in (
        "d_model",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "moe_ffn_dim",
        "num_experts",
        "attn_output_multiplier",
    ):
        assert model.config[field] == c[field], field
    forward = jit_forward(c)
    assert _rel_err(forward(model.params, jnp.asarray(TOKENS)), forward(params, jnp.asarray(TOKENS))) < 1e-6


def test_hf_port_in_pytorch_bin_shards(tmp_path):
    """The ports' published form: sharded bfloat16 `.bin` files, read without unpickling code."""
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=10, q_gain=3.0)
    write_hf_port(tmp_path / "hf", params, c, "keyfan", fmt="bin")
    assert hf_grok.detect(tmp_path / "hf") and not list((tmp_path / "hf").glob("*.safetensors"))
    vj.convert(tmp_path / "hf", tmp_path / "m")
    assert orbax_io.param_shapes(tmp_path / "m")["layers"]["experts"]["down"]["kernel"].dtype == jnp.bfloat16
    model = vj.load(tmp_path / "m", dtype=np.float32)
    as_bf16 = jax.tree_util.tree_map(lambda a: np.asarray(a, ml_dtypes.bfloat16).astype(np.float32), params)
    forward = jit_forward(c)
    assert _rel_err(forward(model.params, jnp.asarray(TOKENS)), forward(as_bf16, jnp.asarray(TOKENS))) < 1e-6


def test_hf_port_bin_with_code_is_refused_without_running_it(tmp_path):
    import torch

    c = tiny_config(num_layers=1)
    write_hf_port(tmp_path / "hf", random_params(c, seed=10), c, "keyfan", fmt="bin")
    marker = tmp_path / "pwned"
    torch.save(
        {"transformer.in_out_embed.weight": _Exploit(marker)}, tmp_path / "hf" / "pytorch_model-00001-of-00002.bin"
    )
    with pytest.raises(CheckpointFormatError, match="pytorch_model-00001-of-00002.bin: not a PyTorch weights file"):
        vj.convert(tmp_path / "hf", tmp_path / "m")
    assert not marker.exists()


def test_hf_port_with_an_untied_head_is_refused(tmp_path):
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=9)
    write_hf_port(tmp_path / "hf", params, c, "hpcai", lm_head=params["embed"]["embedding"] * 2)
    with pytest.raises(CheckpointFormatError, match="lm_head.weight differs"):
        vj.convert(tmp_path / "hf", tmp_path / "m")
    # The release's options have no meaning for a port (config.json, dense weights): refused by name.
    with pytest.raises(CheckpointFormatError, match="option.s. keep_int8 do not apply to HF-format Grok-1 ports"):
        vj.convert(tmp_path / "hf", tmp_path / "m", keep_int8=True)
