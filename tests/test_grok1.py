"""Grok-1 against shared/docs/grok1.md: a numpy reference forward written from the page alone (no
Flax, no shared blocks), one test per detail of the page that fails if that detail changes, the
released configuration, cached generation, and the SentencePiece tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from grok_utils import jit_forward, layer, make_model, module, random_params, tiny_config

from vishwam_jax import models
from vishwam_jax.models import stack
from vishwam_jax.models.grok1 import Grok1
from vishwam_jax.models.interface import Capabilities
from vishwam_jax.models.layers import check_axes
from vishwam_jax.presets import get_config

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "grok1-tokenizer.model"


# -- the reference: grok1.md, in numpy float64 ----------------------------------------------------
def _rms_norm(x, w, eps, one_plus_w=False):
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * ((1.0 + w) if one_plus_w else w)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _rope(x, positions, theta, interleaved=False):
    """x [b, t, heads, hd]; frequencies 1/theta^(2i/hd), rotating the pair (x1, x2) by position * freq."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = positions[:, :, None, None] * inv  # [b, t, 1, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return np.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    # rotate-half: x * [cos, cos] + concat(-x2, x1) * [sin, sin]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    cos2, sin2 = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    return x * cos2 + np.concatenate([-x2, x1], -1) * sin2


def reference_logits(params, tokens, c, alter: frozenset = frozenset()):
    """grok1.md's forward. `alter` names one deliberately wrong variant (for the detail tests)."""
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    h_q, kh, hd = c.num_heads, c.num_kv_heads, c.head_dim
    norm = lambda x, w: _rms_norm(x, w, c.norm_eps, one_plus_w="one_plus_w" in alter)
    gelu = _gelu_erf if "exact_gelu" in alter else _gelu_tanh

    # 1. tokens equal to pad (0) are masked as keys
    input_mask = tokens > c.pad_token_id
    if "no_pad_mask" in alter:
        input_mask = np.ones_like(input_mask)
    # 2. embedding times its multiplier
    E = P["embed"]["embedding"]
    h = E[tokens] * (1.0 if "no_embedding_multiplier" in alter else c.embedding_multiplier_scale)
    positions = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
    causal = np.tril(np.ones((t, t), bool))
    for i in range(c.num_layers):
        L = layer(P, i)
        # 3a. attention on rms_norm(h), then rms_norm_1 of its output is added
        x = norm(h, L["attn_norm"]["scale"])
        q = np.einsum("btd,dhk->bthk", x, L["attn"]["q"]["kernel"])
        k = np.einsum("btd,dhk->bthk", x, L["attn"]["k"]["kernel"])
        v = np.einsum("btd,dhk->bthk", x, L["attn"]["v"]["kernel"])
        theta = 100_000.0 if "theta_1e5" in alter else c.rope_theta
        q = _rope(q, positions, theta, interleaved="interleaved_rope" in alter)
        k = _rope(k, positions, theta, interleaved="interleaved_rope" in alter)
        k = np.repeat(k, h_q // kh, axis=2)  # query head j reads kv head j // (h / kh)
        v = np.repeat(v, h_q // kh, axis=2)
        logits = np.einsum("bthd,bshd->bhts", q, k)
        if "cap_before_multiplier" in alter:
            logits = 30.0 * np.tanh(logits / 30.0) * c.attn_output_multiplier
        else:
            logits = logits * c.attn_output_multiplier
            if "extra_rsqrt_head_dim" in alter:
                logits = logits / math.sqrt(hd)
            if "no_cap" not in alter:
                logits = 30.0 * np.tanh(logits / 30.0)
        mask = causal[None, None] & input_mask[:, None, None, :]
        logits = np.where(mask, logits, -1e30)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        a = np.einsum("bhts,bshd->bthd", w, v)
        a = np.einsum("bthd,hdD->btD", a, L["attn"]["o"]["kernel"])
        if "pre_norm_only" in alter:
            h = h + a
        else:
            h = h + norm(a, L["post_attn_norm"]["scale"])
        # 3b. MoE on rms_norm_2(h), then rms_norm_3 of its output is added
        x = norm(h, L["moe_norm"]["scale"])
        probs = x @ L["router"]["kernel"]
        probs = np.exp(probs - probs.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1)[..., : c.num_experts_per_token]
        gates = np.take_along_axis(probs, top, axis=-1)
        if "renormalize" in alter:
            gates = gates / gates.sum(-1, keepdims=True)
        m = np.zeros_like(x)
        W, V, U = (L["experts"][name]["kernel"] for name in ("gate", "up", "down"))
        for slot in range(c.num_experts_per_token):
            for e in range(c.num_experts):
                sel = top[..., slot] == e
                if sel.any():
                    xe = x[sel]
                    y = (gelu(xe @ W[e]) * (xe @ V[e])) @ U[e]
                    m[sel] += gates[..., slot][sel][:, None] * y
        if "pre_norm_only" in alter:
            h = h + m
        else:
            h = h + norm(m, L["post_moe_norm"]["scale"])
    # 4. final norm, tied output embedding, output multiplier
    h = norm(h, P["final_norm"]["scale"])
    return (h @ E.T) * (1.0 if "no_output_multiplier" in alter else c.output_multiplier_scale)


TOL = 2e-5  # float32 against float64, relative to the largest logit


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# Pads at the start (left padding), in the middle, and none.
TOKENS = np.array([[0, 0, 17, 300, 41, 5, 99, 12], [7, 8, 0, 9, 10, 480, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def detail_case():
    """A 3-layer model whose logits are sensitive to every detail, and our float32 logits for it."""
    c = tiny_config(num_layers=3)
    params = random_params(c, seed=1, q_gain=25.0)
    ours = np.asarray(jit_forward(c)(params, jnp.asarray(TOKENS)))
    return c, params, ours


def test_matches_numpy_reference_float32():
    """grok-1-tiny at 4 layers, float32, against the page's forward in float64."""
    c = tiny_config(num_layers=4)
    params = random_params(c, seed=0, q_gain=4.0)
    ours = jit_forward(c)(params, jnp.asarray(TOKENS))
    assert ours.dtype == jnp.float32 and ours.shape == (3, 8, c.vocab_size)
    assert _rel_err(ours, reference_logits(params, TOKENS, c)) < TOL


DETAILS = {
    # grok1.md detail -> the wrong variant that our model must NOT match
    "embedding_multiplier": "no_embedding_multiplier",
    "output_multiplier": "no_output_multiplier",
    "attn_multiplier_is_the_only_scaling": "extra_rsqrt_head_dim",
    "tanh_cap_30": "no_cap",
    "cap_after_multiplier": "cap_before_multiplier",
    "four_norms_per_layer": "pre_norm_only",
    "norm_weight_w_not_1_plus_w": "one_plus_w",
    "rotate_half_rope": "interleaved_rope",
    "rope_theta_10000": "theta_1e5",
    "gelu_tanh_approximation": "exact_gelu",
    "padding_masked_as_keys": "no_pad_mask",
}


@pytest.mark.parametrize("detail", sorted(DETAILS))
def test_detail(detail, detail_case):
    """Ours matches the page and not the page with this one detail changed: the detail is both
    implemented and visible in these logits (so changing it in the model fails the test)."""
    c, params, ours = detail_case
    faithful = _rel_err(ours, reference_logits(params, TOKENS, c))
    altered = _rel_err(ours, reference_logits(params, TOKENS, c, frozenset({DETAILS[detail]})))
    assert faithful < TOL
    assert altered > 20 * TOL, (detail, faithful, altered)


def test_norm_eps_is_read_from_the_config():
    """RMSNorm's eps (1e-5, checked in test_released_config) reaches every norm: at an eps large
    enough to matter we still match the reference, and not the reference at 1e-5."""
    c = tiny_config(num_layers=1, norm_eps=0.5)
    params = random_params(c, seed=12)
    ours = jit_forward(c)(params, jnp.asarray(TOKENS))
    assert _rel_err(ours, reference_logits(params, TOKENS, c)) < TOL
    assert _rel_err(ours, reference_logits(params, TOKENS, tiny_config(num_layers=1))) > 20 * TOL


def _reference_moe(x, layer, c, renormalize=False):
    x = np.asarray(x, np.float64)
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), layer)
    probs = np.exp(x @ P["router"]["kernel"])
    probs = probs / probs.sum(-1, keepdims=True)  # softmax over all experts
    top = np.argsort(-probs, axis=-1)[:, : c.num_experts_per_token]
    W, V, U = (P["experts"][name]["kernel"] for name in ("gate", "up", "down"))
    gates = np.take_along_axis(probs, top, axis=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for g, e in zip(gates[n], top[n]):
            out[n] += g * (_gelu_tanh(x[n] @ W[e]) * (x[n] @ V[e])) @ U[e]
    return out


def test_top2_gates_not_renormalized(detail_case):
    """The MoE output is sum(gate * expert) with the two softmax probabilities as they are. (In the
    full forward rms_norm_3 divides out any per-token factor, so this is checked on the MoE itself.)"""
    c, params, _ = detail_case
    first = stack.layer(module(c, params).layers, 0)  # the first DecoderLayer as a module
    x = np.random.default_rng(2).normal(size=(1, 24, c.d_model)).astype(np.float32)
    y, counts = first.moe(jnp.asarray(x))
    ours = np.asarray(y)[0]
    assert _rel_err(ours, _reference_moe(x[0], layer(params, 0), c)) < TOL
    assert _rel_err(ours, _reference_moe(x[0], layer(params, 0), c, renormalize=True)) > 0.1
    chex.assert_shape(counts, (c.num_experts,))
    assert int(counts.sum()) == 24 * c.num_experts_per_token


def test_tied_output_embedding(detail_case):
    """Logits are read off the input embedding table: changing one row of it changes exactly that
    column of the logits (the row's token does not occur in the input), and there is no other
    output matrix."""
    c, params, ours = detail_case
    assert set(params) == {"embed", "layers", "final_norm"}
    assert set(params["embed"]) == {"embedding"}
    changed = jax.tree_util.tree_map(lambda a: a, params)
    row = 450
    assert row not in TOKENS
    changed["embed"] = {"embedding": params["embed"]["embedding"].copy()}
    changed["embed"]["embedding"][row] *= -3.0
    new = np.asarray(jit_forward(c)(changed, jnp.asarray(TOKENS)))
    diff = np.abs(new - ours).max(axis=(0, 1))
    assert diff[row] > 1e-2 and np.delete(diff, row).max() < 1e-5


def test_padding_tokens_are_invisible_to_later_tokens(detail_case):
    """Changing which non-pad token sits beside a pad does not matter through the pad: replacing the
    pad's embedding row (token 0) changes no logits of other positions."""
    c, params, ours = detail_case
    changed = jax.tree_util.tree_map(lambda a: a, params)
    changed["embed"] = {"embedding": params["embed"]["embedding"].copy()}
    changed["embed"]["embedding"][0] = np.random.default_rng(5).normal(size=c.d_model) * 3
    new = np.asarray(jit_forward(c)(changed, jnp.asarray(TOKENS)))
    not_pad = TOKENS != 0
    # Column 0 (the pad token's own logit) changes through the tied output; the rest must not.
    np.testing.assert_allclose(new[not_pad][:, 1:], ours[not_pad][:, 1:], rtol=0, atol=1e-5 * np.abs(ours).max())


def test_released_config():
    c = get_config("grok-1")
    assert c.family == "grok1"
    assert (c.vocab_size, c.d_model, c.num_layers, c.max_seq_len) == (131072, 6144, 64, 8192)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (48, 8, 128)
    assert (c.widening_factor, c.moe_ffn_dim, c.num_experts, c.num_experts_per_token) == (8, 32768, 8, 2)
    assert c.embedding_multiplier_scale == 78.38367176906169 == pytest.approx(math.sqrt(6144))
    assert c.output_multiplier_scale == 0.5773502691896257 == pytest.approx(1 / math.sqrt(3))
    assert c.attn_output_multiplier == 0.08838834764831845 == pytest.approx(1 / math.sqrt(128))
    assert (c.attn_logit_softcap, c.norm_eps, c.rope_theta, c.activation) == (30.0, 1e-5, 10_000.0, "gelu_tanh")
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id, c.tokenizer) == (0, 2, 1, "sentencepiece")
    shapes = nnx.to_pure_dict(nnx.state(models.abstract(c, jnp.bfloat16), nnx.Param))  # no memory
    assert shapes["layers"]["router"]["kernel"].dtype == jnp.float32  # the release routes in float32
    chex.assert_shape(shapes["layers"]["experts"]["gate"]["kernel"], (64, 8, 6144, 32768))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert 314e9 < n < 317e9  # "314B": 64 x (8 experts x 3 x 6144 x 32768 + attention) + embedding
    active = n - 64 * 6 * 3 * 6144 * 32768  # 2 of 8 experts per token
    assert 83e9 < active < 85e9


@pytest.mark.parametrize("name", ["grok-1-tiny", "grok-1-small"])
def test_small_presets_keep_the_structure(name):
    c, full = get_config(name), get_config("grok-1")
    assert c.family == "grok1" and c.num_experts_per_token == 2 and c.num_heads % c.num_kv_heads == 0
    for field in (
        "output_multiplier_scale",
        "attn_logit_softcap",
        "norm_eps",
        "rope_theta",
        "activation",
        "pad_token_id",
        "eos_token_id",
    ):
        assert c[field] == full[field], field
    assert c.embedding_multiplier_scale == pytest.approx(math.sqrt(c.d_model))
    assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(c.head_dim))
    assert get_config("grok-1-tiny").num_layers >= 12  # lexicographic leaf order differs from numeric


def test_bfloat16_forward_tracks_float32():
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=3)
    f32 = jit_forward(c)(params, jnp.asarray(TOKENS))
    bf16 = jit_forward(c)(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params), jnp.asarray(TOKENS))
    assert bf16.dtype == jnp.float32
    assert _rel_err(bf16, f32) < 0.05


@pytest.fixture(scope="module")
def model():
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=4)
    params["embed"]["embedding"] = (
        params["embed"]["embedding"] * 3.0
    )  # varied greedy paths rather than one repeated token
    return make_model(c, params)


def test_cached_greedy_generation_equals_argmax_of_growing_sequence(model):
    prompts = [[5, 9, 33, 3, 71, 18, 40], [300, 12], [8, 0, 6, 11]]  # the last holds a pad token
    out = np.asarray(model.generate(prompts, 8))
    width = 16  # causal: tokens after position p never change logits at p, so one compiled width
    for row, prompt in zip(out, prompts):
        seq = list(prompt)
        for _ in range(8):
            nxt = int(jnp.argmax(model.logits([seq + [0] * (width - len(seq))])[0, len(seq) - 1]))
            seq.append(nxt)
            if nxt == model.config.eos_token_id:
                break
        expected = seq[len(prompt) :]
        assert list(row[: len(expected)]) == expected


def test_cache_chunks_equal_one_pass():
    """Prefill in two chunks through the cache gives the logits of one full pass (positions offset by
    the cache length, pad keys still masked)."""
    c = tiny_config(num_layers=2)
    params = random_params(c, seed=6, q_gain=5.0)
    graphdef, state = nnx.split(module(c, params), nnx.Param)
    tokens = jnp.asarray(TOKENS)
    step = jax.jit(lambda p, t, cache: models.apply(graphdef, p, t, cache=cache))
    full = jit_forward(c)(params, tokens)
    cache = nnx.merge(graphdef, state).init_cache(tokens.shape[0], 16, jnp.float32)
    chex.assert_shape(cache["layers"]["k"], (c.num_layers, 3, 16, c.num_kv_heads, c.head_dim))  # stacked per layer
    first = step(state, tokens[:, :3], cache)
    second = step(state, tokens[:, 3:], first.cache)
    cache = second.cache
    np.testing.assert_array_equal(np.asarray(cache["pos"]), [8, 8, 8])
    chunked = jnp.concatenate([first.logits, second.logits], axis=1)
    # Leading pads see no key at all (their own rows are meaningless); every other position must agree.
    seen = np.cumsum(TOKENS != 0, axis=1) > 0
    assert _rel_err(np.asarray(chunked)[seen], np.asarray(full)[seen]) < 1e-5


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} not present")
def test_sentencepiece_tokenizer():
    from vishwam_jax.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(TOKENIZER)
    assert tok.vocab_size == get_config("grok-1").vocab_size
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["[PAD]", "[BOS]", "[EOS]"]
    ids = tok.encode("The answer to life the universe and everything is of course")
    assert ids[0] == get_config("grok-1").bos_token_id and all(0 < i < 131072 for i in ids)
    assert tok.decode(ids[1:]) == "The answer to life the universe and everything is of course"


def test_generate_cli_on_the_tiny_preset(capsys):
    """`python -m vishwam_jax.generate --model grok-1-tiny` runs end to end (random weights, bytes)."""
    from vishwam_jax import generate

    assert (
        generate.run(["--model", "grok-1-tiny", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith("Hi") and "tok/s" in out.err  # (fewer than 4 decoded if EOS comes first)


@pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} not present")
def test_tokenizer_larger_than_the_vocabulary_is_refused():
    from vishwam_jax.tokenizer import tokenizer_from_file

    with pytest.raises(ValueError, match="has 131072 tokens but the model's vocabulary has 512"):
        tokenizer_from_file(TOKENIZER, get_config("grok-1-tiny"))
    assert tokenizer_from_file(TOKENIZER, get_config("grok-1-small")).vocab_size == 131072


# -- the NNX module -------------------------------------------------------------------------------
def test_module_declares_axes_and_capabilities():
    """Every parameter names a logical axis per dimension; the layers are one stack on a leading
    "layers" axis; norms, router and embedding stay float under weight-only int8."""
    c = tiny_config(num_layers=3)
    m = models.build(c)
    assert isinstance(m, Grok1) and isinstance(m, nnx.Module)
    assert m.capabilities == Capabilities(paged_cache=True, moe=True)
    check_axes(m)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(m, nnx.Param)))
    assert tuple(specs["layers"]["experts"]["gate"]["kernel"]) == ("layers", "experts", "embed", "expert_mlp")
    assert tuple(specs["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    q = nnx.to_pure_dict(nnx.state(models.abstract(tiny_config(num_layers=3, quantization="int8")), nnx.Param))
    assert q["layers"]["attn"]["o"]["kernel"].dtype == jnp.int8 and q["layers"]["attn"]["o"]["kernel_scale"].shape == (
        3,
        1,
        1,
        c.d_model,
    )
    # Quantized experts are stored K-major: down [L, e, d, f], one scale per output channel d.
    down = q["layers"]["experts"]["down"]
    assert down["kernel"].dtype == jnp.int8 and down["kernel"].shape == (3, 4, c.d_model, c.moe_ffn_dim)
    assert down["kernel_scale"].shape == (3, 4, c.d_model, 1)
    qspecs = nnx.to_pure_dict(
        nnx.get_partition_spec(nnx.state(models.build(tiny_config(num_layers=3, quantization="int8")), nnx.Param))
    )
    assert tuple(qspecs["layers"]["experts"]["down"]["kernel"]) == ("layers", "experts", "embed", "expert_mlp")
    assert q["layers"]["router"]["kernel"].dtype == jnp.float32 and set(q["layers"]["attn_norm"]) == {"scale"}
    assert set(q["embed"]) == {"embedding"}


def test_expert_counts_per_layer():
    c = tiny_config(num_layers=3)
    out = models.apply(*nnx.split(module(c, random_params(c, seed=2)), nnx.Param), jnp.asarray(TOKENS))
    chex.assert_shape(out.expert_counts, (3, c.num_experts))
    chex.assert_type(out.expert_counts, jnp.int32)
    np.testing.assert_array_equal(np.asarray(out.expert_counts).sum(axis=1), TOKENS.size * c.num_experts_per_token)


@pytest.mark.parametrize("overrides", [{"remat_policy": "full"}, {"scan_unroll": 2}, {"scan_unroll": 3}])
def test_remat_and_unroll_keep_the_logits(overrides):
    c = tiny_config(num_layers=3)
    params = random_params(c, seed=3)
    chex.assert_trees_all_close(
        jit_forward(tiny_config(num_layers=3, **overrides))(params, jnp.asarray(TOKENS)),
        jit_forward(c)(params, jnp.asarray(TOKENS)),
        rtol=1e-5,
        atol=1e-5,  # fusion across layer boundaries reorders float32 sums
    )


def test_trace_is_independent_of_depth():
    """The layers run under one scan: a 64-layer program has as many operations as a 2-layer one."""

    def size(layers: int) -> int:
        graphdef, state = nnx.split(models.abstract(tiny_config(num_layers=layers)), nnx.Param)
        cache = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(2, 16, jnp.float32))
        step = lambda s, t, cache: models.apply(graphdef, s, t, cache=cache)  # noqa: E731
        return len(jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((2, 1), jnp.int32), cache).jaxpr.eqns)

    assert size(64) == size(2)
