"""The generation engine: cached greedy decoding equals argmax over the growing sequence, batching
with ragged prompts, ring-buffer caches, EOS handling and sampling controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vishwam_jax as vj
from vishwam_jax.inference.engine import PromptTooLongError
from vishwam_jax.inference.sampling import SamplingParams, sample


def spread(params, norm_offset: float = 0.3):
    """Random tiny models collapse onto one token; larger weights (and norms away from identity)
    make their argmax path varied. Norm scales are told apart by their logical axes, not their rank
    (stacked layers give them a leading layer axis)."""

    def one(variable):
        if variable.get_metadata()["out_sharding"][-1] == "norm":
            return variable.replace(variable[...] + norm_offset)
        return variable.replace(variable[...] * 3.0)

    return jax.tree_util.tree_map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.fixture(scope="module", params=["gemma-tiny", "gemma2-tiny", "gemma3-tiny"])
def model(request):
    m = vj.load(request.param, seed=3)
    m.params = spread(m.params)
    return m


def greedy_by_recompute(model, prompts, n):
    """Greedy continuations by a full forward pass over each growing sequence, no cache. Rows are
    padded to one width so that one program serves every step: a causal model's logits at a row's
    last token cannot see the filler after it."""
    seqs = [list(p) for p in prompts]
    width = max(map(len, seqs)) + n
    for _ in range(n):
        logits = model.logits([s + [s[-1]] * (width - len(s)) for s in seqs])
        for row, s in enumerate(seqs):
            s.append(int(jnp.argmax(logits[row, len(s) - 1])))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def test_greedy_cached_decode_equals_argmax_of_growing_sequence(model):
    # Window of the tiny presets is 8: prompts both shorter and longer than it.
    prompts = [list(range(10, 31)), [7, 8, 9], list(range(40, 50))]
    out = np.asarray(model.generate(prompts, 14))
    assert out.shape == (3, 14) and out.dtype == np.int32
    assert [list(row) for row in out] == greedy_by_recompute(model, prompts, 14)


def test_batched_equals_single(model):
    prompts = [list(range(5, 25)), [3, 4, 5, 6]]
    batched = np.asarray(model.generate(prompts, 9))
    for row, prompt in zip(batched, prompts):
        np.testing.assert_array_equal(row, np.asarray(model.generate([prompt], 9))[0])


def test_streaming_chunks_equal_one_call(model):
    prompts = [[11, 12, 13], [50, 51]]
    blocks = []
    streamed = np.asarray(model.generate(prompts, 11, chunk=4, on_tokens=blocks.append))
    np.testing.assert_array_equal(streamed, np.asarray(model.generate(prompts, 11)))
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1)[:, :11], streamed)


def test_stops_at_eos_per_row_and_pads():
    m = vj.load("gemma-tiny", seed=0)
    m.params = spread(m.params, norm_offset=0.0)
    prompt = [5, 6, 7]
    free = [int(t) for t in np.asarray(m.generate([prompt], 8))[0]]
    # The first token that did not occur before becomes EOS: the row must stop right after it.
    j = next(i for i in range(1, 8) if free[i] not in free[:i])
    m = vj.load(vj.get_config("gemma-tiny", eos_token_id=free[j]), seed=0)  # the same weights
    m.params = spread(m.params, norm_offset=0.0)
    out = np.asarray(m.generate([prompt, [9, 9, 9, 9]], 8))
    assert list(out[0][: j + 1]) == free[: j + 1]
    assert list(out[0][j + 1 :]) == [m.config.pad_token_id] * (7 - j)


def test_sampling_is_seeded_and_respects_top_k():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    a = sample(logits, jax.random.key(0), SamplingParams(1.0, top_k=2))
    b = sample(logits, jax.random.key(0), SamplingParams(1.0, top_k=2))
    np.testing.assert_array_equal(a, b)
    assert set(np.asarray(a).tolist()) == {0, 1}
    freq = np.mean(np.asarray(a) == 0)
    assert abs(freq - 0.5 / 0.8) < 0.05


def test_top_p_keeps_smallest_prefix_reaching_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    s = np.asarray(sample(logits, jax.random.key(1), SamplingParams(1.0, top_p=0.7)))
    assert set(s.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    s = np.asarray(sample(logits, jax.random.key(1), SamplingParams(1.0, top_p=0.5)))
    assert set(s.tolist()) == {0}


def test_per_row_sampling_truncates_as_the_sorting_reference():
    """sample_rows' shortcuts (temperature alone: no truncation; top-k alone up to TOP_K_SELECT_MAX:
    a selection, not a sort) keep exactly the tokens the sort-based `truncate` keeps, ties included,
    in a batch mixing greedy, temperature-only, top-k and (forcing the sort) top-p rows."""
    from vishwam_jax.inference import sampling

    logits = jnp.round(jax.random.normal(jax.random.key(0), (6, 1000)) * 4) / 4  # many exact ties
    top_k = jnp.array([0, 0, 5, 40, 1, 256], jnp.int32)
    no_p = jnp.ones((6,), jnp.float32)
    fast = sampling.truncate_top_k(logits, top_k, sampling.TOP_K_SELECT_MAX)
    np.testing.assert_array_equal(fast, sampling.truncate(logits, top_k, no_p))
    seeds, counters = jnp.arange(6, dtype=jnp.uint32), jnp.zeros((6,), jnp.int32)
    temperature = jnp.array([0.0, 0.7, 1.0, 1.3, 0.9, 1.0])
    for p in (no_p, no_p.at[3].set(0.9)):  # the second batch takes the sorting path
        drawn = np.asarray(sampling.sample_rows(logits, seeds, counters, temperature, top_k, p))
        assert drawn[0] == int(jnp.argmax(logits[0]))
        kept = np.asarray(sampling.truncate(logits / temperature.at[0].set(1.0)[:, None], top_k, p)) > -np.inf
        assert all(kept[i, drawn[i]] for i in range(6))
        assert drawn[4] == int(jnp.argmax(logits[4]))  # top_k 1


def test_the_host_chosen_sampling_mode_gives_the_device_decided_tokens():
    """The serving engine picks the mode on the host (`sampling_mode`) so that no step waits on a
    device conditional; each batch gets the tokens `sample_rows` draws when it decides on the device."""
    from vishwam_jax.inference import sampling

    logits = jax.random.normal(jax.random.key(1), (4, 500)) * 3
    seeds, counters = jnp.arange(4, dtype=jnp.uint32), jnp.full((4,), 7, jnp.int32)
    cases = {  # temperature, top_k, top_p per row -> the mode
        "greedy": ([0, 0, 0, 0], [0, 5, 0, 0], [1, 1, 0.5, 1]),
        "temperature": ([0, 0.8, 1.2, 0], [0, 0, 0, 0], [1, 1, 1, 1]),
        "top_k": ([0.8, 0, 1.0, 0.5], [0, 0, 20, 3], [1, 1, 1, 1]),
        "nucleus": ([0.8, 0, 1.0, 0.5], [0, 0, 20, 3], [1, 0.9, 1, 1]),
    }
    cases["nucleus (large top-k)"] = ([1.0, 0, 0, 0], [sampling.TOP_K_SELECT_MAX + 1, 0, 0, 0], [1, 1, 1, 1])
    for name, (t, k, p) in cases.items():
        t, k, p = np.array(t, np.float32), np.array(k, np.int32), np.array(p, np.float32)
        mode = sampling.sampling_mode(t, k, p)
        assert mode == name.split(" ")[0]
        host = sampling.sample_rows(logits, seeds, counters, t, k, p, mode=mode)
        device = sampling.sample_rows(logits, seeds, counters, t, k, p)
        np.testing.assert_array_equal(host, device, err_msg=name)
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sampling.sample_rows(logits, seeds, counters, t, k, p, mode="beam")


def test_greedy_sampling_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), SamplingParams()), jnp.argmax(logits, -1))


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_values_raise(kwargs):
    m = vj.load("gemma-tiny")
    with pytest.raises(ValueError):
        m.generate([[1, 2]], 2, **kwargs)


def test_prompt_too_long_raises():
    m = vj.load("gemma-tiny")
    with pytest.raises(PromptTooLongError, match="exceeds the model's context"):
        m.generate([list(range(3, 200)) + [5] * 60], 10)


def test_sliding_layers_use_ring_buffers_of_window_size():
    model = vj.load("gemma2-tiny")
    c = model.config
    cache = model.module.init_cache(2, 100)
    # Layer i is position i % period of the scanned blocks: each position's cache is stacked over periods.
    period = len(cache["blocks"])
    sizes = [cache["blocks"][i % period]["k"].shape[2] for i in range(c.num_layers)]
    assert sizes == [c.sliding_window if t == "sliding" else 100 for t in c.layer_types]
    assert min(sizes) == 8
    assert all(block["k"].shape[0] == c.num_layers // period for block in cache["blocks"])
