"""The paged caches: page allocation and freeing, block tables, page writes, attention through block
tables (Pallas kernel interpreted, XLA, reference) against the contiguous cache, paged generation of
rows of very different lengths against contiguous generation (DeepSeek-V3 tiny), and the GQA
families' paged K/V (Gemma 2 with global and sliding layers, Grok-1): forward and generate equal the
contiguous cache on shuffled pages that a previous owner left full of stale keys."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vishwam_jax.inference import paged_cache as pc
from vishwam_jax.inference.engine import Generator
from vishwam_jax.models import apply, gemma, grok1, mla
from vishwam_jax.models import deepseek_v3 as ds
from vishwam_jax.models.interface import Capabilities
from vishwam_jax.pallas_kernels import mla_attention
from vishwam_jax.presets import get_config


# -- allocation -------------------------------------------------------------------------------------
def test_allocator_hands_out_each_page_once_and_takes_them_back():
    a = pc.BlockAllocator(5)
    x = a.allocate(3)
    y = a.allocate(2)
    assert sorted(x + y) == [0, 1, 2, 3, 4] and a.num_free == 0
    with pytest.raises(pc.CacheFullError, match="need 1 free pages, only 0 of 5"):
        a.allocate(1)
    a.free(x)
    assert a.num_free == 3
    with pytest.raises(ValueError, match="double free"):
        a.free(x[:1])
    with pytest.raises(ValueError, match="outside the pool"):
        a.free([5])
    with pytest.raises(ValueError, match="double free"):
        a.free([y[0], y[0]])
    assert a.num_free == 3  # failed frees change nothing
    with pytest.raises(pc.CacheFullError):
        a.allocate(4)  # all-or-nothing
    assert a.num_free == 3 and sorted(a.allocate(3)) == sorted(x)
    with pytest.raises(ValueError):
        pc.BlockAllocator(0)


def test_sequences_grow_release_and_form_block_tables():
    cache = pc.PagedCache(8, page=4)
    assert cache.reserve("a", 5) and cache.capacity("a") == 8  # 2 pages
    assert cache.reserve("a", 8) == []  # already room
    cache.reserve("b", 1)
    cache.reserve("a", 9)  # a third page for "a"
    assert len(cache.pages("a")) == 3 and cache.allocator.num_free == 4
    table = cache.block_table(["b", "a"])
    assert table.dtype == np.int32 and table.shape == (2, 3)
    assert list(table[1]) == cache.pages("a")
    assert list(table[0]) == cache.pages("b") + [8, 8]  # unused entries: the out-of-range id
    with pytest.raises(ValueError, match="max_blocks=2"):
        cache.block_table(["a"], max_blocks=2)
    with pytest.raises(pc.CacheFullError):
        cache.reserve("c", 100)
    assert "c" not in cache and cache.allocator.num_free == 4  # a failed reservation leaves nothing behind
    cache.release("a")
    assert cache.allocator.num_free == 7 and "a" not in cache
    with pytest.raises(KeyError):
        cache.release("a")


# -- page writes ----------------------------------------------------------------------------------
def test_write_tokens_places_each_token_in_its_page_and_drops_the_rest():
    rng = np.random.default_rng(0)
    page, c = 4, 3
    pool = jnp.asarray(rng.standard_normal((6, page, c)), jnp.float32)
    table = jnp.asarray([[4, 1, 6], [0, 6, 6]], jnp.int32)  # 6 = out of range (unused)
    values = jnp.asarray(rng.standard_normal((2, 3, c)), jnp.float32)
    # row 0 writes positions 3, 4, 5 (crossing from page 4 into page 1); row 1 has one live token
    # at position 2 and two padding tokens; a row-1 token at position 5 would fall in an unused entry
    positions = jnp.asarray([[3, 4, 5], [2, 3, 5]], jnp.int32)
    lengths = jnp.asarray([3, 1], jnp.int32)
    out = np.asarray(pc.write_tokens(pool, table, values, positions, lengths))
    want = np.array(pool)
    want[4, 3], want[1, 0], want[1, 1] = values[0, 0], values[0, 1], values[0, 2]
    want[0, 2] = values[1, 0]
    np.testing.assert_array_equal(out, want)
    # the same with every token live: the one aimed at row 1's unused entry is dropped, not written
    out = np.asarray(pc.write_tokens(pool, table, values, positions, jnp.asarray([3, 3])))
    want[0, 3] = values[1, 1]
    np.testing.assert_array_equal(out, want)


# -- attention through block tables ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["pallas_interpret", "xla"])
def test_mla_decode_through_block_tables_equals_contiguous(impl):
    """Rows of very different lengths, pages allocated after churn (so out of order), each row owning
    only the pages it needs; s_q = 2 (causal) against the contiguous cache's reference."""
    rng = np.random.default_rng(1)
    dv, dr, heads, s_q = 32, 16, 8, 2
    lengths = [2, 300, 64, 129]
    cache = pc.PagedCache(16)
    for i in range(6):  # churn: interleaved reservations and releases shuffle the free list
        cache.reserve(("junk", i), 64 * (1 + i % 2))
    for i in (1, 4, 2):
        cache.release(("junk", i))
    for b, n in enumerate(lengths):
        cache.reserve(b, n)
    table = jnp.asarray(cache.block_table(range(len(lengths))))
    assert cache.pages(1) != sorted(cache.pages(1))  # the 300-token row's pages are out of order
    contiguous = rng.standard_normal((len(lengths), 320, dv + dr)).astype(np.float32)
    pool = pc.init_pool(cache.num_blocks, dv + dr, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(320), (len(lengths), 320))
    pool = pc.write_tokens(pool, table, jnp.asarray(contiguous), positions, jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(pc.gather_tokens(pool, table))[1, :300], contiguous[1, :300])
    q = jnp.asarray(rng.standard_normal((len(lengths), s_q, heads, dv + dr)), jnp.float32)
    kw = dict(softmax_scale=0.2, v_head_dim=dv)
    want = mla_attention.mla_decode_reference(q, jnp.asarray(contiguous), jnp.asarray(lengths), **kw)
    got = mla_attention.mla_decode(
        q, pool, jnp.asarray(lengths), block_table=table, implementation=impl, num_splits=2, **kw
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


# -- the model and the generator ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("deepseek-v3-tiny")
    module = ds.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(module, nnx.Param)
    # every parameter random (norm weights included), so no path can hide behind ones
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return cfg, graphdef, jax.tree_util.tree_unflatten(tree, leaves)


def test_model_forward_on_a_paged_cache_equals_contiguous(tiny):
    """A right-padded prefill chunk then two decode steps: identical logits on both caches."""
    cfg, graphdef, params = tiny
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 70)))
    lengths = jnp.asarray([5, 70])
    cache = pc.PagedCache(6)
    cache.reserve("short", 5 + 2)
    cache.reserve("long", 70 + 2)
    table = cache.block_table(["short", "long"])
    paged = model.init_paged_cache(table, cache.num_blocks, jnp.float32)
    flat = model.init_cache(2, 72, jnp.float32)
    step = jax.jit(
        lambda c, t, n: (lambda out: (out.logits, out.cache))(apply(graphdef, params, t, cache=c, lengths=n))
    )
    for chunk, n in (
        (tokens, lengths),
        (tokens[:, :1], jnp.ones(2, jnp.int32)),
        (tokens[:, 1:2], jnp.ones(2, jnp.int32)),
    ):
        a, paged = step(paged, chunk, n)
        b, flat = step(flat, chunk, n)
        live = np.arange(chunk.shape[1])[None, :] < np.asarray(n)[:, None]
        np.testing.assert_allclose(np.asarray(a)[live], np.asarray(b)[live], rtol=1e-5, atol=1e-5)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    # One stacked pool per layer stack, read through the one block table of every layer.
    chex.assert_shape(paged["dense_layers"]["kv"], (cfg.num_dense_layers, 6, pc.PAGE, width))
    chex.assert_shape(paged["moe_layers"]["kv"], (cfg.num_layers - cfg.num_dense_layers, 6, pc.PAGE, width))
    np.testing.assert_array_equal(paged["block_table"], table)
    # Each layer's tokens sit in its own pool at the pages of the table: layer by layer, the
    # gathered rows equal the contiguous cache's (the pools are not mixed up between layers).
    for stack in ("dense_layers", "moe_layers"):
        for layer in range(paged[stack]["kv"].shape[0]):
            gathered = np.asarray(pc.gather_tokens(paged[stack]["kv"][layer], jnp.asarray(table)))
            for row, n in enumerate((5 + 2, 70 + 2)):
                np.testing.assert_allclose(
                    gathered[row, :n], np.asarray(flat[stack]["kv"][layer, row, :n]), rtol=1e-5, atol=1e-5
                )


def test_paged_generation_equals_contiguous_in_fewer_pages(tiny):
    """A 3-token and a 100-token prompt: a contiguous cache gives both rows 106 slots (4 pages'
    worth); the paged generator fits them in 1 + 2 pages and returns the same tokens, then frees
    every page; a pool one page short is refused before anything runs."""
    cfg, graphdef, params = tiny
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, cfg.vocab_size, 3)), list(rng.integers(3, cfg.vocab_size, 100))]
    want = np.asarray(Generator(graphdef, cfg).generate(params, prompts, max_new_tokens=6))
    gen = Generator(graphdef, cfg, paged_blocks=3)
    got = np.asarray(gen.generate(params, prompts, max_new_tokens=6))
    np.testing.assert_array_equal(got, want)
    assert gen.paged.allocator.num_free == 3
    short = Generator(graphdef, cfg, paged_blocks=2)
    with pytest.raises(pc.CacheFullError):
        short.generate(params, prompts, max_new_tokens=6)
    assert short.paged.allocator.num_free == 2


def test_model_generate_with_paged_blocks_equals_contiguous(tiny):
    """The public API: Model.generate(..., paged_blocks=N) returns the contiguous cache's greedy
    tokens (a short and a long prompt, streamed in chunks), gives its pages back, and is refused
    clearly for a family without a latent cache or a pool size that is not a page count."""
    import vishwam_jax as vj

    cfg, graphdef, params = tiny
    model = vj.Model(nnx.merge(graphdef, params))
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(3, cfg.vocab_size, 4)), list(rng.integers(3, cfg.vocab_size, 90))]
    want = np.asarray(model.generate(prompts, 7))
    got = np.asarray(model.generate(prompts, 7, paged_blocks=3, chunk=3))
    np.testing.assert_array_equal(got, want)
    assert model._paged_generators[3].paged.allocator.num_free == 3
    assert model.last_generation_stats.prefill_tokens == 94
    with pytest.raises(pc.CacheFullError):
        model.generate(prompts, 7, paged_blocks=2)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="paged_blocks must be a positive number"):
            model.generate(prompts, 7, paged_blocks=bad)

    class Unpaged(gemma.Gemma):  # a family that does not declare the capability
        capabilities = Capabilities()

    g = vj.Model(Unpaged(get_config("gemma-tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="gemma-tiny has no paged cache"):
        g.generate([[5, 6, 7]], 2, paged_blocks=4)


def test_every_family_declares_and_builds_its_paged_cache(tiny):
    """The paged cache is a declared capability of every family, each building its own pools:
    DeepSeek-V3 its MLA latents, Grok-1 every layer's K/V, Gemma its global layers' K/V (its
    sliding-window layers keep per-row rings of the window)."""
    cfg, graphdef, params = tiny
    table = np.zeros((3, 2), np.int32)
    model = nnx.merge(graphdef, params)
    assert model.capabilities.paged_cache
    pools = jax.eval_shape(lambda: model.init_paged_cache(table, 4, jnp.float32))
    chex.assert_shape(
        pools["moe_layers"]["kv"],
        (cfg.num_layers - cfg.num_dense_layers, 4, pc.PAGE, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
    )
    g_cfg = get_config("grok-1-tiny", num_layers=2)
    grok = nnx.eval_shape(lambda: grok1.Grok1(g_cfg, rngs=nnx.Rngs(0)))
    assert grok.capabilities.paged_cache
    layers = jax.eval_shape(lambda: grok.init_paged_cache(table, 4, jnp.float32))["layers"]
    kv = (2, 4, pc.PAGE, g_cfg.num_kv_heads, g_cfg.head_dim)
    chex.assert_shape((layers["k"], layers["v"], layers["slot_pos"]), [kv, kv, kv[:3]])
    g_cfg = get_config("gemma2-tiny")  # 4 layers: 2 periods of (sliding, global)
    gem = nnx.eval_shape(lambda: gemma.Gemma(g_cfg, rngs=nnx.Rngs(0)))
    assert gem.capabilities.paged_cache
    sliding, full = jax.eval_shape(lambda: gem.init_paged_cache(table, 4, jnp.float32))["blocks"]
    chex.assert_shape(full["k"], (2, 4, pc.PAGE, g_cfg.num_kv_heads, g_cfg.head_dim))
    chex.assert_shape(sliding["k"], (2, 3, g_cfg.sliding_window, g_cfg.num_kv_heads, g_cfg.head_dim))


def test_mla_write_latents_dispatches_on_the_block_table():
    """models/mla.py routes a paged layer cache through write_tokens and keeps its table."""
    pool = pc.init_pool(3, 4, jnp.float32, page=2)
    layer = {"kv": pool, "block_table": jnp.asarray([[2, 0]], jnp.int32)}
    kv = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    out = mla.write_latents(layer, kv, jnp.asarray([[1, 2, 3]]), jnp.asarray([3]))
    assert out["block_table"] is layer["block_table"]
    np.testing.assert_array_equal(np.asarray(out["kv"])[2, 1], kv[0, 0])
    np.testing.assert_array_equal(np.asarray(out["kv"])[0], kv[0, 1:])


# -- paged K/V of the GQA families -------------------------------------------------------------------
GQA = ["gemma2-tiny", "grok-1-tiny"]  # gemma2-tiny at 2 layers: one sliding-window and one global layer


@pytest.fixture(scope="module")
def gqa_models():
    """name -> a `vj.Model` of the 2-layer preset (random weights, each loaded once per module)."""
    import vishwam_jax as vj

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = vj.load(get_config(name, num_layers=2), seed=1)
        return loaded[name]

    return get


def stale_pools(cache: dict, num_blocks: int) -> dict:
    """The paged cache as a failed previous owner would leave its pages: NaN keys and values, and
    every page recording positions 0..63 (so its slots claim early, visible positions for any row
    that holds it as a later page). Per-row leaves (rings, positions, the table) stay as they are."""

    def junk(x):
        if x.ndim < 3 or x.shape[1:3] != (num_blocks, pc.PAGE):
            return x
        if x.dtype == jnp.int32:
            return jnp.broadcast_to(jnp.arange(pc.PAGE, dtype=jnp.int32), x.shape)
        return jnp.full(x.shape, jnp.nan, x.dtype)

    return jax.tree_util.tree_map(junk, cache)


@pytest.mark.parametrize("name", GQA)
def test_gqa_forward_on_a_paged_cache_equals_contiguous(gqa_models, name):
    """Right-padded prefill chunks of uneven lengths (one row crossing a page boundary mid-chunk, a
    pad token inside a prompt: a masked key for Grok-1), then decode steps with an idle row: the
    logits of every live token equal the contiguous cache's. The rows' pages are shuffled in the
    pool and full of a previous owner's keys."""
    gqa = gqa_models(name)
    model = gqa.module
    vocab = gqa.config.vocab_size
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, vocab, size=(2, 96)).astype(np.int32)
    tokens[1, 9] = gqa.config.pad_token_id
    num_blocks = 7
    table = np.array([[5, 1, 3], [0, 6, num_blocks]], np.int32)  # out of order; row 1 owns 2 pages
    paged = stale_pools(model.init_paged_cache(table, num_blocks, jnp.float32), num_blocks)
    flat = model.init_cache(2, 3 * pc.PAGE, jnp.float32)

    @jax.jit  # both caches in one program: one compilation per chunk width
    def step(paged, flat, chunk, n):
        forward = lambda cache: apply(gqa.graphdef, gqa.params, chunk, cache=cache, lengths=n)  # noqa: E731
        a, b = forward(paged), forward(flat)
        return a.logits, b.logits, a.cache, b.cache

    chunks = [  # (tokens, lengths): row 0 reaches 24, 56, 88 (crossing page 0 -> 1 mid-chunk), then
        # decodes one token and idles; row 1 reaches 20, 52, then decodes three tokens
        (np.stack([tokens[0, :32], tokens[1, :32]]), [24, 20]),
        (np.stack([tokens[0, 24:56], tokens[1, 20:52]]), [32, 32]),
        (np.stack([tokens[0, 56:88], tokens[1, 52:84]]), [32, 1]),
        (tokens[:, 90:91], [1, 1]),
        (tokens[:, 91:92], [0, 1]),
    ]
    for chunk, n in chunks:
        n = jnp.asarray(n, jnp.int32)
        a, b, paged, flat = step(paged, flat, jnp.asarray(chunk), n)
        live = np.arange(chunk.shape[1])[None, :] < np.asarray(n)[:, None]
        np.testing.assert_allclose(np.asarray(a)[live], np.asarray(b)[live], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(paged["pos"], [89, 55])
    np.testing.assert_array_equal(paged["block_table"], table)


def test_gqa_generate_with_paged_blocks_equals_contiguous(gqa_models):
    """Model.generate(..., paged_blocks=N) gives the contiguous cache's greedy tokens for a short and
    a long prompt in 1 + 2 pages (contiguous: 2 rows x 2 pages' worth) and gives every page back;
    Gemma 2 (pools and rings in one period) with the stacked weights held as per-layer buffers (the
    GPU serving layout, models/stack.py), so the pools are carried through unrolled layers too (the
    forward test runs the scan; tests/test_serving.py serves Grok-1 paged against contiguous generate)."""
    import vishwam_jax as vj
    from vishwam_jax.models import stack

    gqa = gqa_models("gemma2-tiny")
    model = vj.Model(nnx.merge(gqa.graphdef, stack.unstack_layers(gqa.params)))
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(3, 250, 3)), list(rng.integers(3, 250, 70))]
    want = np.asarray(model.generate(prompts, 8))
    got = np.asarray(model.generate(prompts, 8, paged_blocks=3))
    np.testing.assert_array_equal(got, want)
    assert model._paged_generators[3].paged.allocator.num_free == 3
