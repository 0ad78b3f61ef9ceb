"""Gemma 1/2/3 against HuggingFace transformers on tiny random configs: convert, load, compare."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_utils import assert_logits_close, hf_greedy, randomize_all  # noqa: E402

import vishwam_jax as vj  # noqa: E402

COMMON = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

CASES = {
    # MQA, Gemma 1 norms and scaling.
    "gemma": lambda: transformers.GemmaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1),
    # GQA, attention and final soft-capping, sliding window (6) shorter than the sequences, a
    # query_pre_attn_scalar unlike head_dim.
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    # QK-norm, 5:1 local/global pattern, separate local/global RoPE with linear scaling.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 7},
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=5,
        query_pre_attn_scalar=20,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0},
        },
    ),
}
MODEL_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    hf_config = CASES[name]()
    hf_config._attn_implementation = "eager"  # soft-capping is applied by the eager path only
    hf = getattr(transformers, MODEL_CLASSES[name])(hf_config).eval()
    randomize_all(hf, seed=1)
    src = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(src, safe_serialization=True)
    dst = tmp_path_factory.mktemp(f"ours-{name}") / "model"
    vj.convert(src, dst)
    return name, hf, vj.load(dst, dtype=np.float32)


def test_logits_match_transformers(converted):
    name, hf, model = converted
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 97, size=(2, 19))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    assert_logits_close(model.logits(tokens), theirs)


def test_greedy_generation_matches_transformers(converted):
    name, hf, model = converted
    rng = np.random.default_rng(1)
    # Prompts of different lengths in one batch, the longest beyond the sliding window.
    prompts = [list(rng.integers(3, 97, size=n)) for n in (13, 4, 9)]
    ours = np.asarray(model.generate(prompts, max_new_tokens=10))
    for row, prompt in zip(ours, prompts):
        theirs = hf_greedy(hf, [int(t) for t in prompt], 10)
        assert list(row[: len(theirs)]) == theirs, (name, list(row), theirs)


def test_config_read_from_hf(converted):
    name, hf, model = converted
    c = model.config
    assert c.num_layers == hf.config.num_hidden_layers
    if name == "gemma3":
        assert c.use_qk_norm and c.rope_scaling_type == "linear" and c.rope_scaling_factor == 4.0
        assert c.rope_theta == 50_000.0 and c.rope_local_theta == 1_000.0
        assert c.layer_types == ("sliding",) * 5 + ("full", "sliding")
    if name == "gemma2":
        assert c.attn_logit_softcap == 5.0 and c.final_logit_softcap == 3.0 and c.query_pre_attn_scalar == 24
