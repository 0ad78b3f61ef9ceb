"""The paged GQA decode kernel against its reference and against the XLA gather path it replaces on
GPUs (CPU: the kernel runs in Pallas' interpreter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vishwam_jax as vj
from vishwam_jax.inference.serving import Engine, EngineConfig, Request
from vishwam_jax.models import attention
from vishwam_jax.pallas_kernels.paged_attention import paged_decode_gpu, paged_decode_reference

NUM_BLOCKS, PAGE = 12, 64


def paged_case(rng, ends, h, kh, d, dv, max_blocks=4):
    """Pools whose pages are handed out in a shuffled order, with stale NaNs past a row's end, a
    masked key inside a row, and block-table entries past a row's pages that point outside the pool."""
    k = rng.standard_normal((NUM_BLOCKS, PAGE, kh, d)).astype(np.float32)
    v = rng.standard_normal((NUM_BLOCKS, PAGE, kh, dv)).astype(np.float32)
    pos = np.full((NUM_BLOCKS, PAGE), -1, np.int32)
    table = np.full((len(ends), max_blocks), NUM_BLOCKS, np.int32)
    free = list(rng.permutation(NUM_BLOCKS))
    for r, end in enumerate(ends):
        for j in range(-(-end // PAGE)):
            table[r, j] = page = free.pop()
            pos[page] = j * PAGE + np.arange(PAGE)
            used = min(PAGE, end - j * PAGE)  # slots past the end keep a previous owner's positions
            pos[page, used:] = rng.integers(-1, 300, PAGE - used)
    row = int(np.argmax(ends))
    last = table[row, (ends[row] - 1) // PAGE]
    v[last, ends[row] % PAGE or PAGE - 1 :] = np.nan  # stale slots past the end, in the row's last page
    pos[table[row, 0], 3] = -1  # a masked key
    q = rng.standard_normal((len(ends), h, d)).astype(np.float32)
    return [jnp.asarray(a) for a in (q, k, v, pos, table, np.asarray(ends, np.int32))]


@pytest.mark.parametrize(
    "h, kh, d, dv, softcap, window, splits, block_k",
    [
        (8, 1, 32, 32, 0.0, 0, 1, 64),  # MQA (gemma-2b's grouping)
        (8, 4, 32, 32, 20.0, 100, 3, 32),  # soft-capping, a window, more splits than some rows have tiles
        (4, 4, 16, 32, 0.0, 0, 2, 64),  # one query head per KV head, a wider value head
    ],
)
def test_kernel_matches_reference(h, kh, d, dv, softcap, window, splits, block_k):
    args = paged_case(np.random.default_rng(h + kh + splits), [130, 0, 200, 64, 1], h, kh, d, dv)
    kw = dict(scale=0.3, softcap=softcap, window=window)
    want = paged_decode_reference(*args, **kw)
    got = paged_decode_gpu(*args, **kw, num_splits=splits, block_k=block_k, interpret=True)
    assert np.isfinite(np.asarray(want)).all() and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert not np.asarray(got)[1].any()  # a row with no key attends to nothing


def test_reference_is_the_gather_path():
    """The reference (and so the kernel) applies the cache's own visibility rule."""
    q, k, v, pos, table, ends = paged_case(np.random.default_rng(7), [130, 3, 200], 8, 2, 32, 32)
    cache = {"k": k, "v": v, "slot_pos": pos, "block_table": table}
    keys, values, key_pos = attention.read_kv_pages(cache, ends)
    mask = attention.visible((ends - 1)[:, None], key_pos, 0)
    want = attention.attend_segments(q[:, None], [(keys, values, mask)], scale=0.3)[:, 0]
    got = paged_decode_reference(q, k, v, pos, table, ends, scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_serving_with_the_kernel_gives_the_gather_paths_tokens(monkeypatch):
    model = vj.load("gemma-shakespeare", dtype=np.float32)
    config = EngineConfig(num_slots=4, max_len=128, prefill_rows=2, chunk_buckets=(16, 64), num_pages=10)
    rng = np.random.default_rng(0)
    requests = [
        Request(i, tuple(int(t) for t in rng.integers(3, 250, n)), int(rng.integers(8, 30)))
        for i, n in enumerate([5, 70, 12, 40, 90])
    ]
    outputs = {}
    for impl in ("off", "interpret"):
        monkeypatch.setattr(attention, "PAGED_DECODE_KERNEL", impl)
        engine = Engine(model, config)
        assert engine.paged
        outputs[impl] = engine.run(requests)
        assert engine.pages_used == 0
    assert outputs["interpret"] == outputs["off"]


def test_under_a_mesh_decode_keeps_the_xla_path(monkeypatch):
    """XLA cannot partition the Pallas call, and per device it would need query and KV heads split
    alike: under an active mesh the paged decode stays on the XLA path."""
    from vishwam_jax.sharding import make_mesh, use_mesh

    monkeypatch.setattr(attention, "PAGED_DECODE_KERNEL", "interpret")
    q, k, v, pos, table, _ = paged_case(np.random.default_rng(1), [70], 8, 2, 32, 32)
    cache = {"k": k, "v": v, "slot_pos": pos, "block_table": table}
    assert attention.paged_decode_kernel_applies(q[:, None], cache)
    with use_mesh(make_mesh(devices=jax.devices()[:1])):
        assert not attention.paged_decode_kernel_applies(q[:, None], cache)
