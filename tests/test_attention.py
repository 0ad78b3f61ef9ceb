"""The shared GQA attention core: query blocking changes memory, never the result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam_jax.models.attention import attend_segments


def _segments(key, b=2, t=13, s_cache=7, kh=2, d=8, dv=6):
    ks = jax.random.split(key, 6)
    cache = (
        jax.random.normal(ks[0], (b, s_cache, kh, d)),
        jax.random.normal(ks[1], (b, s_cache, kh, dv)),
        jax.random.bernoulli(ks[2], 0.7, (b, t, s_cache)),
    )
    causal = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
    causal = causal.at[1, :, 9:].set(False)  # a row whose last keys are padding
    chunk = (jax.random.normal(ks[3], (b, t, kh, d)), jax.random.normal(ks[4], (b, t, kh, dv)), causal)
    return [cache, chunk]


@pytest.mark.parametrize("query_block", [1, 4, 5, 12])
def test_query_blocks_equal_one_block_forward_and_gradient(query_block):
    key = jax.random.PRNGKey(0)
    segments = _segments(key)
    q = jax.random.normal(jax.random.PRNGKey(1), (2, 13, 4, 8))

    masks = [m for _, _, m in segments]
    kvs = [(k, v) for k, v, _ in segments]

    def loss(q, kvs, block):
        out = attend_segments(
            q, [(k, v, m) for (k, v), m in zip(kvs, masks)], scale=0.3, softcap=2.0, query_block=block
        )
        return jnp.sum(jnp.sin(out)), out

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, ref), ref_grads = grad_fn(q, kvs, 10**6)
    (_, got), got_grads = jax.jit(grad_fn, static_argnums=2)(q, kvs, query_block)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_long_prompts_never_hold_all_scores():
    b, t, h, kh, d = 1, 4096, 8, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, kh, d), jnp.float32)
    m = jax.ShapeDtypeStruct((b, t, t), jnp.bool_)
    fn = lambda q, k, m, block: attend_segments(q, [(k, k, m)], scale=1.0, query_block=block)
    temp = lambda block: (
        jax.jit(fn, static_argnums=3).lower(q, k, m, block).compile().memory_analysis().temp_size_in_bytes
    )
    all_scores = b * h * t * t * 4  # float32
    # One block at a time: scratch scales with the block (a few score-sized buffers of it), not with t.
    assert temp(t) > all_scores
    assert temp(1024) < temp(t) / 3 and temp(512) < temp(1024) * 0.6


@pytest.mark.parametrize("preset", ["gemma2-tiny", "grok-1-tiny"])
def test_models_give_the_same_logits_with_small_query_blocks(preset, monkeypatch):
    import vishwam_jax as vj
    from vishwam_jax.models import attention

    model = vj.load(preset, dtype="float32")
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 40), 3, model.config.vocab_size)
    ref = model.logits(tokens)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    model = vj.load(preset, dtype="float32")  # a fresh model: nothing compiled with the old block
    np.testing.assert_allclose(model.logits(tokens), ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("preset", ["gemma3-tiny", "gemma2-tiny"])
def test_the_fused_prefill_branch_equals_the_xla_path(preset, monkeypatch):
    """The branch that gives cuDNN's fused kernel the chunks that start their rows (GPU only), run on
    a CPU with jax's XLA implementation of the same call: the same logits without a cache (training),
    and the same tokens from a prompt prefilled into a contiguous or ring cache, a paged cache, and
    in two chunks (the second takes the cond's general branch). Gemma 2's soft-capped layers keep
    the XLA path."""
    import vishwam_jax as vj
    from vishwam_jax.models import attention

    config = vj.get_config(preset, max_seq_len=256)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 90), 3, config.vocab_size)
    prompts = [list(np.asarray(tokens[0, :90])), list(np.asarray(tokens[1, :70]))]

    long_prompt = tuple(int(t) for t in jax.random.randint(jax.random.PRNGKey(4), (150,), 3, config.vocab_size))

    def run():
        from vishwam_jax.inference.serving import Engine, EngineConfig, Request

        model = vj.load(config, dtype="float32", seed=2)  # a fresh model: nothing compiled before the patch
        # The engine prefills 150 tokens in chunks of 64 at positions 0, 64, 128 (the second: the general branch).
        engine = Engine(model, EngineConfig(num_slots=2, max_len=200, prefill_rows=1, chunk_buckets=(64,)))
        served = engine.run([Request(0, long_prompt, 4)])[0]
        return model.logits(tokens), model.generate(prompts, 6), model.generate(prompts, 6, paged_blocks=16), served

    want = run()
    calls = []
    monkeypatch.setattr(attention, "FUSED_IMPLEMENTATION", "xla")
    monkeypatch.setattr(attention, "fused_attention_applies", lambda q, softcap: softcap == 0.0)
    real = attention.fused_causal_attention
    monkeypatch.setattr(attention, "fused_causal_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = run()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want[0]))))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    assert got[3] == want[3]
    assert bool(calls) == (config.attn_logit_softcap == 0.0)


def test_a_refused_fused_kernel_falls_back_to_the_xla_path(monkeypatch, caplog):
    """If cuDNN's checks refuse a layer at trace time, the layer runs on the XLA path and says so;
    VISHWAM_ATTENTION_IMPL=xla turns the fused path off."""
    import vishwam_jax as vj
    from vishwam_jax.models import attention

    config = vj.get_config("gemma3-tiny", max_seq_len=128)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 70), 3, config.vocab_size)
    want = vj.load(config, dtype="float32", seed=2).logits(tokens)
    monkeypatch.setattr(attention, "fused_attention_applies", lambda q, softcap: True)

    def refuse(*args, **kwargs):
        raise NotImplementedError("head dim not supported")

    monkeypatch.setattr(attention, "fused_causal_attention", refuse)
    with caplog.at_level("WARNING"):
        got = vj.load(config, dtype="float32", seed=2).logits(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert "runs on the XLA path" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv(attention.ENV_VAR, "xla")
    assert not attention.fused_attention_applies(jnp.zeros((1, 64, 2, 16), jnp.bfloat16), 0.0)
