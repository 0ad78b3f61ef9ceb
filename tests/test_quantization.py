"""Quantized weights (vishwam_jax/quantization): the formats' error bounds, the quantized linear and
grouped matmul against their definition (the float ops on the dequantized weight), int8 and fp8 for
every family, conversion with quantize= (DeepSeek-V3's FP8 release kept bit for bit and run against
transformers on the dequantized weights), load-time quantization and the CLIs' errors."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_convert import write_hf_gemma

import vishwam_jax as vj
from vishwam_jax import models
from vishwam_jax.checkpoint import hf_deepseek, orbax_io
from vishwam_jax.checkpoint.orbax_io import Quantized
from vishwam_jax.models import layers
from vishwam_jax.models.layers import linear
from vishwam_jax.pallas_kernels import grouped_matmul
from vishwam_jax.presets import ConfigError, get_config, replace
from vishwam_jax.quantization import (
    Quantization,
    QuantizationError,
    QuantizedWeight,
    dequantize,
    quantize,
    scale_shape,
)
from vishwam_jax.quantization.params import quantize_params

TOKENS = jnp.array([[3, 5, 7, 9, 11, 2, 4, 6], [8, 1, 5, 5, 2, 9, 3, 7]], jnp.int32)
E4M3_REL = 2.0**-4  # 3 mantissa bits: round to nearest is within half of 2^-3 of the value
E4M3_MIN_NORMAL = 2.0**-6  # below it (times the block's scale), e4m3 is subnormal: absolute steps of 2^-9


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- the formats -----------------------------------------------------------------------------------
def test_formats_error_bounds_and_partial_blocks():
    """int8: within half a step (amax/127 per output channel). fp8: the block's scale maps its amax to
    448; values within e4m3's relative half-step, or its subnormal step. numpy (converters) and
    jax.numpy (load) give the same bytes. A 300 x 200 matrix in 128 x 128 blocks: partial edges."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 300, 200)) * rng.uniform(0.01, 3, (3, 1, 200))).astype(np.float32)
    q, s = quantize(w, "int8", (1, 1), xp=np)
    assert q.dtype == np.int8 and s.shape == (3, 1, 200) == scale_shape("int8", w.shape, (1, 1), (128, 128))
    back = dequantize(q, s, "int8", (1, 1), (128, 128), np.float32, xp=np)
    assert np.all(np.abs(back - w) <= 0.5 * s * (1 + 1e-6))
    qj, sj = quantize(jnp.asarray(w), "int8", (1, 1))
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)

    q, s = quantize(w, "fp8", (1, 1), (128, 128), xp=np)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 3, 2)
    block = w[1, 256:, 128:]  # the corner block: 44 x 72
    np.testing.assert_allclose(s[1, 2, 1], np.abs(block).max() / 448, rtol=1e-7)
    back = dequantize(q, s, "fp8", (1, 1), (128, 128), np.float32, xp=np)
    spread = np.repeat(np.repeat(s, 128, 1), 128, 2)[:, :300, :200]
    assert np.all(np.abs(back - w) <= E4M3_REL * np.abs(w) + 2.0**-10 * spread)
    assert np.abs(back - w).max() > 0  # really quantized
    qj, sj = quantize(jnp.asarray(w), "fp8", (1, 1), (128, 128))
    np.testing.assert_array_equal(np.asarray(qj).view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(sj), s)
    # A kernel with heads split out: its matrix is [K, N] over the flattened trailing dims.
    q3, s3 = quantize(w[0].reshape(300, 20, 10), "fp8", (1, 2), (128, 128), xp=np)
    np.testing.assert_array_equal(q3.reshape(300, 200).view(np.uint8), q[0].view(np.uint8))
    np.testing.assert_array_equal(s3, s[0])
    with pytest.raises(QuantizationError, match="not one of int8, fp8"):
        quantize(w, "int4", (1, 1))


@pytest.mark.parametrize(
    "fmt, impl", [("int8", "xla"), ("fp8", "xla"), ("int8", "pallas_interpret"), ("fp8", "pallas_interpret")]
)
def test_linear_is_the_float_linear_on_the_dequantized_weight(fmt, impl, monkeypatch):
    """Every way a Linear is contracted, including MLA's absorbed W_k_b (contracting the axis its
    int8 scale varies along, so the weight is dequantized rather than the output scaled). With the
    GPU kernel's backend (interpret mode), fp8 products that are one matmul over the weight's
    contracted dimensions read the float8 weight through the block-scaled kernel, K-major matrices
    (an MLP's) included; int8 K-major ones through XLA's dot on the transposed values. The input's
    gradient too."""
    monkeypatch.setenv("VISHWAM_GMM_IMPL", impl)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 4, 40)).astype(np.float32)  # [r, h, nope] as wk_b
    values, scale = quantize(w, fmt, (1, 2), (16, 16), xp=np)
    qw = QuantizedWeight(jnp.asarray(values), jnp.asarray(scale), fmt, (1, 2), (16, 16))
    dense = qw.dequantize(jnp.float32)
    for spec, x_shape in (("bsc,chn->bshn", (2, 3, 24)), ("bthn,chn->bthc", (2, 3, 4, 40))):
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        np.testing.assert_allclose(linear(x, qw, spec), linear(x, dense, spec), rtol=1e-5, atol=1e-5)
    wo = rng.standard_normal((4, 6, 20)).astype(np.float32)  # [h, v, d]: two contracted dims
    values, scale = quantize(wo, fmt, (2, 1), (16, 16), xp=np)
    qo = QuantizedWeight(jnp.asarray(values), jnp.asarray(scale), fmt, (2, 1), (16, 16))
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 6)), jnp.float32)
    np.testing.assert_allclose(
        linear(x, qo, "bthv,hvd->btd"), linear(x, qo.dequantize(jnp.float32), "bthv,hvd->btd"), rtol=1e-5, atol=1e-5
    )
    up = rng.standard_normal((40, 24)).astype(np.float32)  # [d, f]: K and N not multiples of the block
    values, scale = quantize(up, fmt, (1, 1), (16, 16), xp=np, k_major=True)
    qu = QuantizedWeight(jnp.asarray(values), jnp.asarray(scale), fmt, (1, 1), (16, 16), k_major=True)
    assert qu.shape == (24, 40)
    assert layers._kernel_takes("Ad,df->Af", qu) == (impl == "pallas_interpret" and fmt == "fp8")
    dense = qu.dequantize(jnp.float32)
    for x_shape in ((2, 3, 40), (1, 1, 40), (5, 40)):
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        want = linear(x, dense, "...d,df->...f")
        np.testing.assert_allclose(linear(x, qu, "...d,df->...f"), want, rtol=1e-5, atol=1e-5)

    def loss(x, w):
        return jnp.sum(jnp.sin(linear(x, w, "...d,df->...f")))

    x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    np.testing.assert_allclose(jax.grad(loss)(x, qu), jax.grad(loss)(x, dense), rtol=1e-5, atol=1e-5)


def test_grouped_matmul_fp8_blocks_match_the_dequantized_weights():
    """gmm with fp8 block scales (partial edge blocks, an empty group, a transposed rhs) on the
    reference and XLA backends, and its lhs gradient, equal gmm on the dequantized float weights."""
    rng = np.random.default_rng(2)
    g, k, n, m = 3, 40, 24, 20
    w = rng.standard_normal((g, k, n)).astype(np.float32)
    values, scale = (jnp.asarray(a) for a in quantize(w, "fp8", (1, 1), (16, 16), xp=np))
    dense = dequantize(values, scale, "fp8", (1, 1), (16, 16), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    sizes = jnp.array([7, 0, 11], jnp.int32)  # 2 rows past the groups: zeros
    want = grouped_matmul.gmm(x, dense, sizes, implementation="reference")
    for impl in ("reference", "xla"):
        got = grouped_matmul.gmm(x, values, sizes, rhs_scale=scale, rhs_scale_block=(16, 16), implementation=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
    # Transposed rhs [g, n, k]: the blocks stay on the matrix as stored.
    vt, st = (jnp.asarray(a) for a in quantize(w.swapaxes(1, 2), "fp8", (1, 1), (16, 16), xp=np))
    dt = dequantize(vt, st, "fp8", (1, 1), (16, 16), jnp.float32)
    got = grouped_matmul.gmm(x, vt, sizes, transpose_rhs=True, rhs_scale=st, rhs_scale_block=(16, 16))
    want_t = grouped_matmul.gmm(x, dt, sizes, transpose_rhs=True, implementation="reference")
    np.testing.assert_allclose(got, want_t, rtol=1e-5, atol=1e-5)
    grad = jax.grad(
        lambda a: jnp.sum(grouped_matmul.gmm(a, values, sizes, rhs_scale=scale, rhs_scale_block=(16, 16)) ** 2)
    )(x)
    grad_want = jax.grad(lambda a: jnp.sum(grouped_matmul.gmm(a, dense, sizes) ** 2))(x)
    np.testing.assert_allclose(grad, grad_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_k_major_storage_is_the_float_layout_transposed(fmt):
    """K-major values and scales are those of the [K, N] matrix transposed (a non-square block, so a
    mixed-up side fails); dequantize gives the float layout back; the grouped matmul through
    `quantized_gmm` computes the float kernel's product on every backend that can run here."""
    from vishwam_jax.models.layers import quantized_gmm

    rng = np.random.default_rng(4)
    g, k, n, m, block = 3, 40, 48, 20, (32, 16)  # blocks the block-scaled kernel takes (powers of two >= 16)
    w = rng.standard_normal((g, k, n)).astype(np.float32)
    values, scale = quantize(w, fmt, (1, 1), block, xp=np)
    kv, ks = quantize(w, fmt, (1, 1), block, xp=np, k_major=True)
    assert kv.shape == (g, n, k) and ks.shape == scale_shape(fmt, kv.shape, (1, 1), block, k_major=True)
    assert ks.shape == ((g, n, 1) if fmt == "int8" else (g, 3, 2))  # 3 N blocks of 16, 2 K blocks of 32
    np.testing.assert_array_equal(kv, values.swapaxes(1, 2))
    np.testing.assert_array_equal(ks, scale.swapaxes(1, 2))
    dense = dequantize(kv, ks, fmt, (1, 1), block, np.float32, xp=np, k_major=True)
    np.testing.assert_array_equal(dense, dequantize(values, scale, fmt, (1, 1), block, np.float32, xp=np))
    with pytest.raises(QuantizationError, match="K-major"):
        scale_shape(fmt, (4, 8, 2), (1, 2), block, k_major=True)
    qw = QuantizedWeight(jnp.asarray(kv), jnp.asarray(ks), fmt, (1, 1), block, k_major=True)
    np.testing.assert_array_equal(qw.dequantize(jnp.float32), dense)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    sizes = jnp.array([7, 0, 11], jnp.int32)
    want = grouped_matmul.gmm(x, jnp.asarray(dense), sizes, implementation="reference")
    for impl in ("reference", "xla", "pallas_interpret"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(grouped_matmul.ENV_VAR, impl)
            got = quantized_gmm(x, qw.values, qw.scale, sizes, qw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)


# -- every family, both formats --------------------------------------------------------------------
def _dequantized_state(float_state: nnx.State, quantized: nnx.State) -> nnx.State:
    """The float model's state with each quantized kernel replaced by its dequantized values."""
    qflat = dict(nnx.to_flat_state(quantized))
    out = []
    for path, v in nnx.to_flat_state(float_state):
        scale = qflat.get(path[:-1] + ("kernel_scale",))
        if scale is not None and path[-1] == "kernel":
            out.append((path, v.replace(_weight(qflat[path], scale).dequantize(jnp.float32))))
        else:
            out.append((path, v))
    return nnx.from_flat_state(out)


def _weight(kernel, scale) -> QuantizedWeight:
    from vishwam_jax.quantization.formats import weight_of

    return weight_of(kernel, scale)


# Logit error of the quantized model against the original float model, as a fraction of max |logit|,
# measured on gemma2-tiny (seed 0, the 2 x 8 TOKENS, 16 x 16 fp8 blocks): int8 1.5 %, fp8 9.1 %.
# Each weight moves by at most half a quantization step (int8: amax/254 of its output channel; fp8:
# 1/16 of the value, or e4m3's subnormal step in its block), and the quantized model is exactly the
# float model at those weights (checked to 1e-5 below); the MoE families' logits are not bounded by the
# weights' error at all, since a route that flips on a near-tie changes a token's experts outright.
DENSE_LOGIT_BOUND = {"int8": 0.03, "fp8": 0.15}


@pytest.mark.parametrize(
    "preset, formats",
    # DeepSeek-V3's fp8 runs end to end in the release test below (against transformers).
    [("gemma2-tiny", ("int8", "fp8")), ("grok-1-tiny", ("int8", "fp8")), ("deepseek-v3-tiny", ("int8",))],
)
def test_every_family_runs_int8_and_fp8_as_its_dequantized_float_model(preset, formats):
    config = get_config(preset, quantization_block=(16, 16))
    float_module = models.build(config, rngs=nnx.Rngs(0))
    graphdef, float_state = nnx.split(float_module, nnx.Param)
    forward = jax.jit(lambda g, p, t: models.apply(g, p, t).logits, static_argnums=0)
    reference = forward(graphdef, float_state, TOKENS)
    for fmt in formats:
        qconfig = replace(config, quantization=fmt)
        qgraphdef, target = nnx.split(models.abstract(qconfig), nnx.Param)
        qstate = quantize_params(float_state, target, Quantization(fmt, (16, 16)))
        flat = dict(nnx.to_flat_state(qstate))
        kernels = [p for p, v in flat.items() if p[-1] == "kernel" and v.get_value().dtype != jnp.float32]
        assert kernels and all(p[:-1] + ("kernel_scale",) in flat for p in kernels)
        names = {".".join(map(str, p)) for p in kernels}
        assert not [n for n in names if "router" in n or "embed" in n or "lm_head" in n], names
        assert all(v.get_value().dtype == jnp.float32 for p, v in flat.items() if "norm" in str(p))
        got = forward(qgraphdef, qstate, TOKENS)
        as_float = forward(graphdef, _dequantized_state(float_state, qstate), TOKENS)
        assert _rel(got, as_float) < 1e-5, (preset, fmt)
        if preset.startswith("gemma"):
            assert _rel(got, reference) < DENSE_LOGIT_BOUND[fmt], (fmt, _rel(got, reference))


# -- conversion and loading ------------------------------------------------------------------------
def test_convert_and_load_quantized_gemma_and_cli_errors(tmp_path, capsys):
    """A float HF checkpoint converted with quantize= holds the same bytes as the float conversion
    quantized at load; config.json records the format; another format is a clear error; the CLIs
    answer a bad value in one line with exit 2."""
    write_hf_gemma(tmp_path / "hf", d=32, ffn=48)
    vj.convert(tmp_path / "hf", tmp_path / "float")
    vj.convert(tmp_path / "hf", tmp_path / "fp8", quantize="fp8")
    assert orbax_io.read_config(tmp_path / "fp8").quantization == "fp8"
    stored = orbax_io.param_shapes(tmp_path / "fp8")["blocks"]["layers"][0]["mlp"]["up"]
    assert stored["kernel"].dtype == ml_dtypes.float8_e4m3fn and stored["kernel_scale"].dtype == np.float32
    converted = vj.load(tmp_path / "fp8", dtype="bfloat16")  # scales and values keep their dtypes
    at_load = vj.load(tmp_path / "float", quantize="fp8")
    for (path, a), (_, b) in zip(nnx.to_flat_state(converted.params), nnx.to_flat_state(at_load.params)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        if path[-1] == "kernel_scale" or a.dtype == ml_dtypes.float8_e4m3fn:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    np.testing.assert_allclose(converted.logits(TOKENS[:1]), at_load.logits(TOKENS[:1]), rtol=0.02, atol=0.02)
    with pytest.raises(QuantizationError, match="stored quantized as fp8.*cannot be loaded as int8"):
        vj.load(tmp_path / "fp8", quantize="int8")
    with pytest.raises(QuantizationError, match="not one of int8, fp8"):
        vj.convert(tmp_path / "hf", tmp_path / "x", quantize="int4")
    convert_cli = importlib.import_module("vishwam_jax.convert")
    generate_cli = importlib.import_module("vishwam_jax.generate")
    assert convert_cli.run([str(tmp_path / "hf"), str(tmp_path / "y"), "--quantize", "int4"]) == 2
    assert generate_cli.run(["--model", "gemma-shakespeare", "--quantize", "nf4", "--max-new-tokens", "2"]) == 2
    assert generate_cli.run(["--model", str(tmp_path / "fp8"), "--quantize", "int8", "--max-new-tokens", "2"]) == 2
    assert generate_cli.run(["--model", str(tmp_path / "float"), "--fp8-activations", "--max-new-tokens", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors
    assert "--quantize must be one of int8, fp8" in errors[0] and "cannot be loaded as int8" in errors[2]
    assert "fp8 activations need fp8 weights" in errors[3]
    # The converted fp8 directory with fp8 activations: the same leaves, products on float8 inputs.
    fp8_inputs = vj.load(tmp_path / "fp8", quantize_activations="fp8")
    kernels = [v.get_metadata().get("quantization") for _, v in nnx.to_flat_state(fp8_inputs.params)]
    assert {q.activations for q in kernels if q is not None} == {"fp8"}
    np.testing.assert_allclose(fp8_inputs.logits(TOKENS[:1]), converted.logits(TOKENS[:1]), rtol=0.1, atol=0.1)
    with pytest.raises(ConfigError, match="needs quantization='fp8'"):
        get_config("gemma-tiny", quantization="int8", quantization_activations="fp8")
    with pytest.raises(ConfigError, match="'int4' is not one of none, fp8"):
        get_config("gemma-tiny", quantization="fp8", quantization_activations="int4")
    assert generate_cli.run(["--quantize", "int8", "--max-new-tokens", "4", "--temperature", "0"]) == 0


# DeepSeek-V3 in the release's FP8 format: per-head nope and v dims of one 16-column block each, so
# kv_b_proj's blocks split with W_k_b / W_v_b (as the release's 128s do); q_lora 24 and moe width 24
# leave partial edge blocks.
FP8_HF = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=64, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)  # fmt: skip


FP8_ACTIVATION_TOL = 0.1


def test_deepseek_fp8_release_kept_bit_for_bit_matches_transformers(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_utils import randomize_all
    from safetensors.torch import save_file
    from test_deepseek_v3 import _quantize_fp8

    torch.manual_seed(0)
    hf_model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**FP8_HF)).eval()
    randomize_all(hf_model)
    state, release, f = hf_model.state_dict(), {}, FP8_HF["moe_intermediate_size"]
    flat = {}  # the release's names: one [out, in] tensor per expert (transformers fuses them in memory)
    for name, w in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            for e in range(w.shape[0]):
                flat[f"{name[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = w[e, :f]
                flat[f"{name[: -len('gate_up_proj')]}{e}.up_proj.weight"] = w[e, f:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(w.shape[0]):
                flat[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = w[e]
        else:
            flat[name] = w
    dequantized = {}
    for name, w in flat.items():
        if "proj" in name and name.endswith(".weight") and w.ndim == 2:
            q, s = _quantize_fp8(w, 16)
            release[name], release[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            spread = s.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w.shape[0], : w.shape[1]]
            dequantized[name] = q.float() * spread
        else:
            release[name] = w.contiguous()
    for name in state:  # back into transformers' layout, dequantized
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            base, proj = name.rsplit(".", 1)
            parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
            experts = range(state[name].shape[0])
            state[name] = torch.stack(
                [torch.cat([dequantized[f"{base}.{e}.{q}.weight"] for q in parts]) for e in experts]
            )
        elif name in dequantized:
            state[name] = dequantized[name]
    src = tmp_path / "release"
    src.mkdir()
    save_file(release, src / "model.safetensors")
    hf_config = {
        **hf_model.config.to_dict(),
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]},
    }
    (src / "config.json").write_text(json.dumps(hf_config))
    vj.convert(src, tmp_path / "fp8", quantize="fp8")
    config = orbax_io.read_config(tmp_path / "fp8")
    assert (config.quantization, tuple(config.quantization_block)) == ("fp8", (16, 16))

    stored = orbax_io.from_disk_tree(orbax_io.restore_params(tmp_path / "fp8"))
    layer = {"dense_layers": 0, "moe_layers": 1}
    h, nope, v = 2, 16, 16

    def same_bytes(ours: dict, name: str, values: np.ndarray, scale: np.ndarray) -> None:
        assert ours["kernel"].dtype == ml_dtypes.float8_e4m3fn, name
        assert np.asarray(ours["kernel"]).tobytes() == np.ascontiguousarray(values).tobytes(), name
        assert np.asarray(ours["kernel_scale"]).tobytes() == np.ascontiguousarray(scale).tobytes(), name

    def src_pair(name):
        q, s = release[name + ".weight"], release[name + ".weight_scale_inv"]
        return q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), s.numpy()

    checked = 0
    for stack, i in layer.items():
        attn = {k: jax.tree_util.tree_map(lambda a: a[0], w) for k, w in stored[stack]["attn"].items()}
        p = f"model.layers.{i}.self_attn."
        for ours, theirs, shape in (
            ("wq_a", "q_a_proj", None), ("wq_b", "q_b_proj", (24, h, 32)), ("wkv_a", "kv_a_proj_with_mqa", None),
            ("wo", "o_proj", (h, v, 32)),
        ):  # fmt: skip
            q, s = src_pair(p + theirs)
            if shape is None:  # one input and one output dimension: stored K-major, the release's [out, in]
                same_bytes(attn[ours], ours, q, s)
            else:
                same_bytes(attn[ours], ours, q.T.reshape(shape), s.T)
            checked += 1
        q, s = src_pair(p + "kv_b_proj")
        kv = q.T.reshape(16, h, nope + v)
        grid = s.T.reshape(1, h, 2)
        same_bytes(attn["wk_b"], "wk_b", kv[..., :nope], grid[..., :1].reshape(1, h))
        same_bytes(attn["wv_b"], "wv_b", kv[..., nope:], grid[..., 1:].reshape(1, h))
        checked += 2
    experts = stored["moe_layers"]["experts"]["down"]
    for e in range(4):
        q, s = src_pair(f"model.layers.1.mlp.experts.{e}.down_proj")
        # Experts are stored K-major, the release's own [out, in] layout: its bytes as they are.
        same_bytes({k: a[0, e] for k, a in experts.items()}, f"expert {e}", q, s)
    for stack, mlp, theirs in (("dense_layers", "mlp", "mlp."), ("moe_layers", "shared", "mlp.shared_experts.")):
        for ours in ("gate", "up", "down"):  # K-major as well: the release's bytes as they are
            q, s = src_pair(f"model.layers.{layer[stack]}.{theirs}{ours}_proj")
            weights = stored[stack][mlp][ours]
            same_bytes({k: a[0] for k, a in weights.items()}, f"{stack} {ours}", q, s)
            checked += 1
    assert checked == 18

    model = vj.load(tmp_path / "fp8")
    hf_model.load_state_dict(state)  # transformers on the dequantized weights
    with torch.no_grad():
        theirs = hf_model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    # Weight-only: both run float32 on the same dequantized weights, so only summation order differs.
    assert _rel(model.logits(TOKENS), theirs) < 1e-4
    # FP8 activations too (DeepSeek-V3's inference numerics): every product's input rounded to e4m3
    # in 1 x 16 tiles here. On the kernels (interpret mode) as on XLA, within the error of that rounding.
    with_fp8_inputs = vj.load(tmp_path / "fp8", quantize_activations="fp8").logits(TOKENS)
    assert 1e-4 < _rel(with_fp8_inputs, theirs) < FP8_ACTIVATION_TOL  # 0.033 when written
    monkeypatch.setenv(grouped_matmul.ENV_VAR, "pallas_interpret")
    on_kernels = vj.load(tmp_path / "fp8", quantize_activations="fp8").logits(TOKENS)
    assert _rel(on_kernels, with_fp8_inputs) < 1e-5
    unaligned = hf_deepseek._split_kv_b(
        Quantized(*src_pair("model.layers.0.self_attn.kv_b_proj")), np.asarray, h, 8, 24, 16, "k"
    )
    assert unaligned is None  # a block straddling the per-head split is requantized instead
