"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM (+ its MTP module) on tiny random
configs with every parameter and buffer randomised: convert, load, compare logits and greedy
generation; absorbed decode against the naive form; routing against numpy; FP8 conversion;
MTP speculative decoding against plain greedy; the bias update."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import chex  # noqa: E402
from flax import nnx  # noqa: E402
from hf_utils import assert_logits_close, hf_greedy, randomize_all  # noqa: E402
from mtp_utils import good_drafter  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vishwam_jax import models  # noqa: E402
from vishwam_jax.checkpoint import hf_deepseek  # noqa: E402
from vishwam_jax.checkpoint.convert import convert  # noqa: E402
from vishwam_jax.checkpoint.orbax_io import from_disk_tree, read_config, restore_params  # noqa: E402
from vishwam_jax.checkpoint.safetensors_io import CheckpointFormatError  # noqa: E402
from vishwam_jax.inference.engine import Generator  # noqa: E402
from vishwam_jax.inference.speculative import SpeculativeGenerator  # noqa: E402
from vishwam_jax.loading import load  # noqa: E402
from vishwam_jax.models import apply  # noqa: E402
from vishwam_jax.models import deepseek_v3 as ds  # noqa: E402
from vishwam_jax.models.moe import grouped_sigmoid_router  # noqa: E402
from vishwam_jax.presets import get_config, replace  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10_000.0,
}
# 16 experts in 4 groups of 4 (the top-2 sum inside a group matters), 2 groups and 3 experts per
# token; one dense layer first; the rope part (16) long enough for YaRN to ramp across pairs.
BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=16,
    qk_nope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    rope_parameters=YARN,
)


def _jit_forward(graphdef):
    return jax.jit(lambda p, t: apply(graphdef, p, t).logits)


def _release_mtp_tensors(mtp, hf) -> dict:
    """transformers' MtpModel weights under the release's names: one more decoder layer, index
    num_hidden_layers, per-expert tensors, with copies of the embedding and the output head."""
    n = hf.config.num_hidden_layers
    f = hf.config.moe_intermediate_size
    out = {}
    for name, t in mtp.state_dict().items():
        if not name.startswith("layers.0."):
            continue  # embed_tokens / shared_head: the main model's own
        rest = name.removeprefix("layers.0.").removeprefix("mtp_block.")
        rest = rest.replace("post_norm.", "shared_head.norm.")
        if rest == "mlp.experts.gate_up_proj":
            for e in range(t.shape[0]):
                out[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"] = t[e, :f]
                out[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"] = t[e, f:]
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[f"model.layers.{n}.{rest}"] = t
    out[f"model.layers.{n}.embed_tokens.weight"] = hf.model.embed_tokens.weight
    out[f"model.layers.{n}.shared_head.head.weight"] = hf.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _build(tmp_path_factory, name, hf_kwargs, *, with_mtp: bool, release_config: bool = False):
    """A random transformers model saved as safetensors (+ the MTP layer in release layout),
    converted and loaded back."""
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_kwargs)).eval()
    randomize_all(hf, seed=1)
    src = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(src, safe_serialization=True)
    mtp = None
    if with_mtp:
        mtp = MtpModel(hf, 1).eval()
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # every MTP weight and buffer but the shared embedding/head
            for pname, p in list(mtp.named_parameters()) + list(mtp.named_buffers()):
                if pname.startswith("layers.") and p.is_floating_point():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.5 if "norm" in pname else 0.0))
        save_file(_release_mtp_tensors(mtp, hf), src / "model-mtp.safetensors")
    if release_config:
        _rewrite_config_as_release(src)
    dst = tmp_path_factory.mktemp(f"ours-{name}") / "model"
    convert(src, dst)
    model = load(dst)
    return types.SimpleNamespace(
        hf=hf, mtp=mtp, src=src, dst=dst, config=model.config, graphdef=model.graphdef, params=model.params, model=model
    )


def _rewrite_config_as_release(src):
    """config.json as the official release writes it: `rope_scaling` with "type", top-level
    rope_theta, no rope_interleave when interleaved (its default)."""
    path = src / "config.json"
    hf = json.loads(path.read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hf["rope_scaling"] = rope
    if hf.get("rope_interleave") is True:
        del hf["rope_interleave"]
    hf.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, num_nextn_predict_layers=1)
    path.write_text(json.dumps(hf))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return _build(tmp_path_factory, "v3", BASE, with_mtp=True)


# -- parity with transformers ----------------------------------------------------------------------
def test_logits_and_expert_counts_match_transformers(case):
    tokens = np.random.default_rng(0).integers(3, 97, size=(2, 19))
    with torch.no_grad():
        theirs = case.hf(torch.tensor(tokens)).logits.numpy()
    assert_logits_close(_jit_forward(case.graphdef)(case.params, jnp.asarray(tokens)), theirs)
    out = jax.jit(lambda p, t: apply(case.graphdef, p, t))(case.params, jnp.asarray(tokens))
    counts = np.asarray(out.expert_counts)
    chex.assert_shape(out.expert_counts, (2, 16))
    chex.assert_type(out.expert_counts, jnp.int32)
    assert (counts.sum(axis=1) == tokens.size * 3).all()


def test_greedy_generation_matches_transformers(case):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 97, size=n)) for n in (13, 4, 9)]
    ours = np.asarray(case.model.generate(prompts, max_new_tokens=10))
    for row, prompt in zip(ours, prompts):
        theirs = hf_greedy(case.hf, [int(t) for t in prompt], 10)
        assert list(row[: len(theirs)]) == theirs


def test_mtp_module_matches_transformers(case):
    tokens = np.random.default_rng(2).integers(3, 97, size=(2, 12))
    ids = torch.tensor(tokens)
    with torch.no_grad():
        hidden = case.hf.model(ids).last_hidden_state
        positions = torch.arange(1, 12)[None].expand(2, -1)  # transformers: the position of each entry's token
        h = case.mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids[:, 1:])
        theirs = case.mtp._project_to_logits(h).numpy()
    assert case.config.num_mtp_layers == 1 and case.model.capabilities.mtp
    g = case.graphdef
    ours_hidden = jax.jit(lambda p, t: apply(g, p, t).hidden)(case.params, jnp.asarray(tokens))
    np.testing.assert_allclose(ours_hidden, hidden.numpy(), atol=1e-5)
    ours = jax.jit(lambda p, h, t: apply(g, p, h, t, method="mtp").logits)(
        case.params, ours_hidden[:, :-1], jnp.asarray(tokens[:, 1:])
    )
    assert_logits_close(ours, theirs)
    # The MTP loss: depth 1 predicts t_{i+2} from entry i.
    logp = theirs[:, :-1] - np.log(np.exp(theirs[:, :-1]).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, tokens[:, 2:, None], axis=-1).mean()
    loss = jax.jit(lambda p, t: apply(g, p, t, method="mtp_loss"))(case.params, jnp.asarray(tokens))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_rotate_half_layout_direct_queries_and_release_config(tmp_path_factory):
    """rope_interleave=false (rotate-half pairs), no query LoRA (DeepSeek-V2-Lite style), unequal
    YaRN mscales (a cos/sin factor != 1), two dense layers, config.json in the release's form, and
    a checkpoint without MTP tensors."""
    kwargs = {
        **BASE,
        "rope_interleave": False,
        "q_lora_rank": None,
        "first_k_dense_replace": 2,
        "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707},
    }
    c = _build(tmp_path_factory, "halves", kwargs, with_mtp=False, release_config=True)
    cfg = c.config
    assert not cfg.rope_interleaved and cfg.q_lora_rank == 0 and cfg.num_dense_layers == 2
    assert cfg.rope_scaling_type == "yarn" and cfg.rope_mscale_all_dim == 0.707 and cfg.num_mtp_layers == 0
    assert "mtp_layers" not in c.params and not c.model.capabilities.mtp
    assert "wq" in c.params["dense_layers"]["attn"] and "wq_a" not in c.params["moe_layers"]["attn"]
    tokens = np.random.default_rng(3).integers(3, 97, size=(2, 17))
    with torch.no_grad():
        theirs = c.hf(torch.tensor(tokens)).logits.numpy()
    assert_logits_close(_jit_forward(c.graphdef)(c.params, jnp.asarray(tokens)), theirs)


# -- MLA: absorbed decode on the latent cache ------------------------------------------------------
@pytest.mark.parametrize("prompt_attention", ["absorbed", "naive"])
def test_absorbed_decode_matches_naive_prefill(case, prompt_attention, monkeypatch):
    """Right-padded rows of different lengths: a 6-token prefill chunk then one token per step
    through the latent cache equals the naive full forward, row by row. The prompt chunk enters
    the empty cache in either form (mla.cached_attention picks naive for long chunks)."""
    from vishwam_jax.models import mla

    monkeypatch.setattr(mla, "NAIVE_PREFILL_MIN_TOKENS", 1 if prompt_attention == "naive" else 10**9)
    cfg, params, g = case.config, case.params, case.graphdef
    rng = np.random.default_rng(4)
    lengths = np.array([16, 11])
    tokens = rng.integers(3, 97, size=(2, 16))
    tokens[1, 11:] = cfg.pad_token_id
    naive = np.asarray(_jit_forward(g)(params, jnp.asarray(tokens)))
    step = jax.jit(lambda p, t, c, n: (lambda out: (out.logits, out.cache))(apply(g, p, t, cache=c, lengths=n)))
    cache = case.model.module.init_cache(2, 24, jnp.float32)
    chex.assert_shape(cache["dense_layers"]["kv"], (1, 2, 24, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    chex.assert_shape(cache["moe_layers"]["kv"], (2, 2, 24, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    logits, cache = step(params, jnp.asarray(tokens[:, :6]), cache, jnp.array([6, 4]))
    got = [[logits[0, i] for i in range(6)], [logits[1, i] for i in range(4)]]
    pos = np.array([6, 4])
    while (pos < lengths).any():
        live = pos < lengths
        nxt = tokens[np.arange(2), np.minimum(pos, 15)][:, None]
        logits, cache = step(params, jnp.asarray(nxt), cache, jnp.asarray(live.astype(np.int32)))
        for b in np.flatnonzero(live):
            got[b].append(logits[b, 0])
        pos = pos + live
    assert list(np.asarray(cache["pos"])) == [16, 11]
    for b in range(2):
        assert_logits_close(np.stack(got[b]), naive[b, : lengths[b]])


def test_latent_cache_is_576_values_per_token_per_layer():
    c = get_config("deepseek-v3-671b")
    module = models.abstract(c)
    cache = jax.eval_shape(lambda: module.init_cache(1, 1, jnp.bfloat16))
    chex.assert_shape(cache["dense_layers"]["kv"], (3, 1, 1, 576))
    chex.assert_shape(cache["moe_layers"]["kv"], (58, 1, 1, 576))  # 61 layers in all
    ours = sum(cache[stack]["kv"].size * 2 for stack in ("dense_layers", "moe_layers"))
    naive_mha = c.num_layers * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    assert ours == 70_272 and naive_mha == 4_997_120  # ~70 KB against ~5 MB per token


# -- routing ---------------------------------------------------------------------------------------
def _numpy_route(logits, bias, k, groups, topk_groups, scale):
    """Group-limited top-k written plainly; ties go to the lower index (stable sorts)."""
    scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    biased = scores + bias
    n, e = scores.shape
    experts, gates = [], []
    for row_s, row_b in zip(scores, biased):
        grouped = row_b.reshape(groups, e // groups)
        group_score = np.array(
            [np.float32(sorted(g, reverse=True)[0]) + np.float32(sorted(g, reverse=True)[1]) for g in grouped]
        )
        best_groups = np.argsort(-group_score, kind="stable")[:topk_groups]
        allowed = np.isin(np.arange(e) // (e // groups), best_groups)
        masked = np.where(allowed, row_b, -np.inf)
        chosen = np.argsort(-masked, kind="stable")[:k]
        g = row_s[chosen]
        experts.append(chosen)
        gates.append(g / g.sum() * scale)
    return np.array(experts), np.array(gates)


def test_group_limited_routing_matches_numpy_with_ties():
    rng = np.random.default_rng(5)
    n, d, e = 64, 64, 32
    # One-hot tokens read router logits straight from a table of few distinct values, and the bias
    # takes few values too: many exact ties among scores, biased scores and group sums.
    table = rng.choice(np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32), size=(d, e))
    bias = rng.choice(np.array([0.0, 0.25, -0.25], np.float32), size=e)
    x = np.eye(n, d, dtype=np.float32)
    gates, experts = jax.jit(
        lambda x, w, b: grouped_sigmoid_router(x, w, b, 6, num_groups=8, topk_groups=3, routed_scaling_factor=2.5)
    )(x, table, bias)
    ref_experts, ref_gates = _numpy_route(x @ table, bias, 6, 8, 3, 2.5)
    np.testing.assert_array_equal(np.asarray(experts), ref_experts)
    np.testing.assert_allclose(np.asarray(gates), ref_gates, rtol=1e-6)


def test_update_router_bias():
    bias = jnp.array([[0.1, 0.0, -0.2, 0.3]], jnp.float32)
    counts = jnp.array([[5, 1, 3, 3]])  # mean 3: over-, under-, exactly loaded
    np.testing.assert_allclose(ds.update_router_bias(bias, counts, 0.01), [[0.09, 0.01, -0.2, 0.3]], rtol=1e-6)
    cfg = get_config("deepseek-v3-tiny")
    params = nnx.state(models.abstract(cfg), nnx.Param)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    counts = jnp.zeros((2, 16), jnp.int32).at[:, 0].set(16)
    new = ds.update_router_biases(params, counts, 0.5)
    assert "router" not in new["dense_layers"]
    np.testing.assert_allclose(new["moe_layers"]["router"]["bias"][...], [[-0.5] + [0.5] * 15] * 2)
    # Nothing else changes: not the MTP block's router bias, not any other parameter.
    rest = lambda state: {k: v for k, v in nnx.to_flat_state(state) if k != ("moe_layers", "router", "bias")}  # noqa: E731
    chex.assert_trees_all_equal(rest(new), rest(params))
    with pytest.raises(ValueError, match="2 MoE layers"):
        ds.update_router_biases(params, counts[:1], 0.5)


# -- MTP speculative decoding ----------------------------------------------------------------------
def test_mtp_speculative_decoding_equals_greedy(case):
    cfg, g = case.config, case.graphdef
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(3, 97, size=n)) for n in (7, 3, 12)]
    spec, greedy = SpeculativeGenerator(g, cfg), Generator(g, cfg)
    for params in (case.params, good_drafter(case.params, 0.3)):
        plain = np.asarray(greedy.generate(params, prompts, 12))
        result = spec.generate(params, prompts, 12)
        np.testing.assert_array_equal(result.tokens, plain)
        # Also with an EOS inside the generation: rows stop at the same token.
        eos_cfg = replace(cfg, eos_token_id=int(plain[0, 5]))
        plain_eos = np.asarray(Generator(g, eos_cfg).generate(params, prompts, 12))
        np.testing.assert_array_equal(SpeculativeGenerator(g, eos_cfg).generate(params, prompts, 12).tokens, plain_eos)
        assert (plain_eos[0, 6:] == cfg.pad_token_id).all()
    assert 0 < result.accepted < result.drafted, (result.accepted, result.drafted)
    assert result.steps < 12 and 0.0 < result.acceptance_rate < 1.0


def test_speculative_decoding_refuses_a_model_without_mtp():
    cfg = get_config("deepseek-v3-tiny", num_mtp_layers=0)
    graphdef, _ = nnx.split(models.abstract(cfg), nnx.Param)
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        SpeculativeGenerator(graphdef, cfg)


# -- conversion ------------------------------------------------------------------------------------
def _quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's block-wise e4m3 quantization: per block, scale_inv = amax / 448."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(br, bc)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_release_conversion_within_fp8_error(case, tmp_path, monkeypatch):
    """Quantize every projection of the f32 checkpoint (main layers and MTP) in the release's
    layout with 16x16 blocks (so that our tiny shapes span several blocks and partial edge blocks),
    convert, and compare with the f32 conversion. Expert stacks are never written whole."""
    from vishwam_jax.checkpoint.orbax_io import CheckpointWriter

    whole = []
    write = CheckpointWriter.write
    monkeypatch.setattr(CheckpointWriter, "write", lambda self, path, a: (whole.append(path), write(self, path, a))[1])
    block = 16
    src = tmp_path / "fp8"
    src.mkdir()
    for f in case.src.glob("*.safetensors"):
        tensors = load_file(f)
        out = {}
        for name, w in tensors.items():
            if "proj" in name and name.endswith(".weight") and w.ndim == 2:
                out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = _quantize_fp8(w, block)
            else:
                out[name] = w.to(torch.bfloat16) if "norm" in name or "embed" in name or "head" in name else w
        save_file(out, src / f.name)
    hf = json.loads((case.src / "config.json").read_text())
    hf["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
    }
    (src / "config.json").write_text(json.dumps(hf))
    _rewrite_config_as_release(src)
    dst = tmp_path / "ours"
    convert(src, dst)
    assert whole and not [p for p in whole if "experts" in p], whole
    assert read_config(dst).to_dict() == case.config.to_dict()
    fp8 = from_disk_tree(restore_params(dst))
    ref = nnx.to_pure_dict(case.params)
    chex.assert_trees_all_equal_shapes(fp8, ref)

    def check(path, ours, orig):
        key = jax.tree_util.keystr(path)
        if "router" in key:
            assert ours.dtype == np.float32, key
            np.testing.assert_array_equal(ours, orig, err_msg=key)
            return
        assert ours.dtype == jnp.bfloat16, key
        ours, orig = np.asarray(ours, np.float32), np.asarray(orig, np.float32)
        # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), bf16 storage adds 2^-9; the block's
        # scale bounds the error of values in e4m3's subnormal range.
        tol = 2.0**-4 * np.abs(orig) + 2.0**-8 * np.abs(orig).max()
        assert (np.abs(ours - orig) <= tol).all(), key
        if "wq_b" in key or ("experts" in key and "down" in key):
            assert not np.array_equal(ours, np.asarray(orig, ml_dtypes.bfloat16).astype(np.float32)), (
                key
            )  # really quantized

    jax.tree_util.tree_map_with_path(check, fp8, ref)


def test_dequantize_128_blocks_with_partial_edges():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(300, 200)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, size=(3, 2)).astype(np.float32)
    expected = np.array(
        [[float(w[i, j]) * scale[i // 128, j // 128] for j in range(200)] for i in range(300)], np.float32
    )
    np.testing.assert_array_equal(hf_deepseek.dequantize_fp8(w, scale, (128, 128)), expected)
    with pytest.raises(CheckpointFormatError, match="q_b_proj.*expected \\(3, 2\\)"):
        hf_deepseek.dequantize_fp8(w, scale[:2], (128, 128), "model.layers.0.self_attn.q_b_proj.weight")


def test_transformers_in_memory_expert_layout_converts_the_same(case, tmp_path):
    """transformers keeps experts fused in memory (gate_up_proj [E, 2f, d], down_proj [E, d, f]);
    a raw state_dict dump in that layout converts to the same parameters."""
    src = tmp_path / "fused"
    src.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in case.hf.state_dict().items()}, src / "model.safetensors")
    (src / "config.json").write_text((case.src / "config.json").read_text())
    convert(src, tmp_path / "ours")
    fused = from_disk_tree(restore_params(tmp_path / "ours"))
    reference = {k: v for k, v in nnx.to_pure_dict(case.params).items() if k != "mtp_layers"}
    chex.assert_trees_all_equal(fused, reference)


def test_bad_checkpoints_are_named(case, tmp_path):
    hf = json.loads((case.src / "config.json").read_text())
    with pytest.raises(CheckpointFormatError, match="scoring_func 'softmax'"):
        hf_deepseek.config_from_hf({**hf, "scoring_func": "softmax"})
    with pytest.raises(CheckpointFormatError, match="required field 'kv_lora_rank' is missing"):
        hf_deepseek.config_from_hf({k: v for k, v in hf.items() if k != "kv_lora_rank"})
    src = tmp_path / "broken"
    src.mkdir()
    tensors = load_file(case.src / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointFormatError, match="model.layers.2.mlp.experts.5.up_proj.weight"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_cli_speculative(capsys):
    from vishwam_jax.generate import run

    assert (
        run(
            [
                "--model",
                "deepseek-v3-tiny",
                "--prompt",
                "abc",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
                "--speculative",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("=== 'abc'\nabc") and "MTP drafts accepted" in err
    assert run(["--model", "deepseek-v3-tiny", "--speculative"]) == 2  # sampling asked for: refused
    assert "pass --temperature 0" in capsys.readouterr().err
