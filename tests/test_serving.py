"""The continuous-batching engine: greedy output alone equals output among others (the embedded
Shakespeare model, 24 concurrent requests, and every family), no compilation in steady state, chunked
prefill that keeps running streams going, stop conditions, per-request seeded sampling, pages freed
on finish and cancel, and a full cache that queues."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest

import vishwam_jax as vj
from vishwam_jax.inference.sampling import SamplingParams
from vishwam_jax.inference.serving import Engine, EngineConfig, Request, RequestRejected


def shakespeare_prompts(tokenizer, count: int, seed: int, max_chars: int) -> list[str]:
    corpus = gzip.open(vj.DEFAULT_MODEL_DIR.parent / "shakespeare.txt.gz", "rt").read()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(corpus) - max_chars, count)
    return [corpus[s : s + int(rng.integers(4, max_chars))] for s in starts]


@pytest.fixture(scope="module")
def shakespeare():
    model = vj.load("gemma-shakespeare", dtype=np.float32)
    engine = Engine(
        model,
        EngineConfig(num_slots=32, max_len=128, prefill_rows=4, chunk_buckets=(16, 64), num_pages=40),
        tokenizer=model.tokenizer,
    )
    engine.warmup()
    return model, engine


def test_24_concurrent_greedy_requests_equal_each_alone_without_recompiling(shakespeare):
    model, engine = shakespeare
    # Gemma pages its global layers: the 40 pages are the cache's memory, not an accounting
    assert engine.paged and engine.cache["blocks"][1]["k"].shape[1] == engine.pages.num_blocks == 40
    compiled = list(engine.compiles)
    assert sorted(compiled) == [("decode", 32), ("prefill", (4, 16)), ("prefill", (4, 64))]
    rng = np.random.default_rng(1)
    texts = shakespeare_prompts(model.tokenizer, 24, seed=0, max_chars=100)
    requests = [Request(i, tuple(model.tokenizer.encode(t)), int(rng.integers(4, 24))) for i, t in enumerate(texts)]
    assert max(len(r.prompt) for r in requests) > 64  # some prompts take two chunks
    # 24 requests of up to 2 pages each from a pool of 40: some wait for pages, not only for slots
    together = engine.run(requests)
    alone = {}
    for r in requests:
        alone.update(engine.run([r]))
    assert together == alone
    assert all(len(together[r.id]) == r.max_tokens or together[r.id][-1] in engine.eos_ids for r in requests)
    assert engine.compiles == compiled  # nothing compiled in steady state
    assert engine.pages_used == 0 and engine.num_running == 0


def test_prefill_buckets_prefill_only_the_rows_that_wait(shakespeare, monkeypatch):
    """prefill_buckets=(1, 2, 4): a step prefills the smallest bucket that holds the prompts waiting,
    so a request that arrives alone costs one row, not prefill_rows; tokens as the one-bucket engine's
    (float32 here: no near-tie flips), nothing compiles after warmup, and bad buckets are refused."""
    model, one_bucket = shakespeare
    engine = Engine(model, dataclasses.replace(one_bucket.config, prefill_buckets=(1, 2, 4)), tokenizer=model.tokenizer)
    engine.warmup()
    compiled = list(engine.compiles)
    assert sorted(c for c in compiled if c[0] == "prefill") == [
        ("prefill", (r, c)) for r in (1, 2, 4) for c in (16, 64)
    ]
    rows = []
    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda slots, *a, **k: rows.append(len(slots)) or prefill(slots, *a, **k))
    texts = shakespeare_prompts(model.tokenizer, 7, seed=3, max_chars=60)
    requests = [Request(i, tuple(model.tokenizer.encode(t)), 8) for i, t in enumerate(texts)]
    assert engine.run(requests[:1]) == one_bucket.run(requests[:1]) and rows == [1]
    rows.clear()
    assert engine.run(requests) == one_bucket.run(requests)
    assert engine.compiles == compiled and engine.pages_used == 0
    assert max(rows) == 4 and set(rows) <= {1, 2, 4}
    for bad in ((1, 2), (0, 4), (4, 8)):
        with pytest.raises(ValueError, match="prefill_buckets must be row counts"):
            EngineConfig(prefill_rows=4, prefill_buckets=bad)


def test_contiguous_rows_give_the_paged_tokens(shakespeare):
    model, paged = shakespeare
    rows = Engine(model, EngineConfig(num_slots=32, max_len=128, prefill_rows=4, chunk_buckets=(16, 64), paged=False))
    assert not rows.paged and rows.cache["blocks"][1]["k"].shape[1:3] == (32, 128)  # [layers, slots, len, ...]
    rng = np.random.default_rng(3)
    texts = shakespeare_prompts(model.tokenizer, 8, seed=2, max_chars=120)
    requests = [Request(i, tuple(model.tokenizer.encode(t)), int(rng.integers(4, 24))) for i, t in enumerate(texts)]
    assert rows.run(requests) == paged.run(requests)
    assert rows.pages_used == 0


def test_a_long_prompt_does_not_stall_running_streams(shakespeare):
    model, engine = shakespeare
    short = Request("short", tuple(model.tokenizer.encode("ROMEO.\n")), 12)
    engine.submit(short)
    engine.step()  # prefilled: its first token
    engine.submit(Request("long", tuple(range(32, 32 + 100)), 4))  # two prefill chunks
    tokens_per_step = []
    while engine.has_work:
        events = engine.step()
        tokens_per_step.append([e.request_id for e in events])
    # The short stream gets a token in every step while the long prompt is prefilled beside it.
    assert all("short" in ids for ids in tokens_per_step[:3])
    assert any("long" in ids for ids in tokens_per_step[:3])


def test_stop_tokens_strings_and_max_tokens(shakespeare):
    model, engine = shakespeare
    prompt = tuple(model.tokenizer.encode("KING HENRY.\nWhat"))
    free = engine.run([Request("free", prompt, 20)])["free"]
    text = model.tokenizer.decode(free)
    events = []
    # Stop token: the 6th generated token ends the request, the token itself is reported.
    out = engine.run([Request("tok", prompt, 20, stop_token_ids=(free[5],))], on_event=events.append)
    first = free.index(free[5])
    assert out["tok"] == free[: first + 1] and events[-1].finish_reason == "stop"
    # Stop string: the text ends just before it.
    stop = text[7:10]
    events.clear()
    out = engine.run([Request("str", prompt, 20, stop=(stop,))], on_event=events.append)
    released = "".join(e.text for e in events)
    assert released == text[: text.index(stop)] and events[-1].finish_reason == "stop"
    events.clear()
    out = engine.run([Request("len", prompt, 5)], on_event=events.append)
    assert out["len"] == free[:5] and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == model.tokenizer.decode(free[:5])
    assert engine.pages_used == 0


def test_seeded_sampling_does_not_depend_on_the_batch(shakespeare):
    model, engine = shakespeare
    hot = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    prompts = [tuple(model.tokenizer.encode(t)) for t in ("HAMLET.\n", "Enter the Ghost", "O Romeo")]
    requests = [Request(i, p, 16, hot, seed=i) for i, p in enumerate(prompts)]
    together = engine.run(requests + [Request("greedy", prompts[0], 16)])
    assert together[0] != together["greedy"]  # it did sample
    for r in requests:
        assert engine.run([r])[r.id] == together[r.id]


def test_requests_that_cannot_run_are_rejected(shakespeare):
    _, engine = shakespeare
    with pytest.raises(RequestRejected, match="exceeds the context of 128"):
        engine.submit(Request("x", (1,) * 100, 29))
    with pytest.raises(RequestRejected, match="empty"):
        engine.submit(Request("x", (), 4))
    with pytest.raises(RequestRejected, match="token ids"):
        engine.submit(Request("x", (1, 10_000), 4))
    assert not engine.has_work


def test_a_full_cache_queues_and_cancel_frees_pages(shakespeare):
    model, engine = shakespeare
    prompt = tuple(model.tokenizer.encode("ROMEO.\nBut soft, what light through yonder window breaks?"))
    alone = engine.run([Request("a", prompt, 30)])["a"]
    # 2 pages each (65-128 tokens) from a pool of 40: 20 run, the rest wait although slots are free.
    for i in range(24):
        engine.submit(Request(i, prompt, 30))
    out = {i: [] for i in range(24)}
    for e in engine.step():
        out[e.request_id].append(e.token)
    assert (engine.num_running, engine.num_waiting, engine.pages_used) == (20, 4, 40)
    assert engine.cancel(0).finish_reason == "cancelled"  # running: its pages go back
    assert engine.cancel(23).finish_reason == "cancelled"  # waiting
    assert engine.cancel(23) is None
    del out[0], out[23]
    while engine.has_work:
        for e in engine.step():
            out[e.request_id].append(e.token)
    assert all(tokens == alone for tokens in out.values())
    assert engine.pages_used == 0


# Gemma is the Shakespeare model above (Gemma-3 style: local and global layers).
@pytest.mark.parametrize(
    "name, paged", [("deepseek-v3-tiny", None), ("grok-1-tiny", None), ("deepseek-v3-tiny", False)]
)
def test_every_family_serves_the_same_tokens_alone_and_together(name, paged):
    model = vj.load(name if name == "deepseek-v3-tiny" else vj.get_config(name, num_layers=2), seed=1)
    config = EngineConfig(num_slots=4, max_len=96, prefill_rows=2, chunk_buckets=(32,), paged=paged)
    engine = Engine(model, config)
    assert engine.paged == (model.capabilities.paged_cache if paged is None else paged)
    rng = np.random.default_rng(0)
    requests = [
        Request(i, tuple(int(t) for t in rng.integers(3, 250, n)), int(rng.integers(3, 16)))
        for i, n in enumerate([3, 70, 9, 40, 33, 5])  # 70 and 40 take several chunks; 6 requests reuse slots
    ]
    together = engine.run(requests)
    assert len(engine.compiles) == 2
    for r in requests:
        assert engine.run([r])[r.id] == together[r.id]
    if engine.paged:  # the paged MLA path, prompt in 3 chunks: as the fixed-batch generator
        r = requests[1]
        reference = np.asarray(model.generate([list(r.prompt)], r.max_tokens))[0]
        assert together[r.id] == [int(t) for t in reference[: len(together[r.id])]]
    assert engine.pages_used == 0


def test_mtp_speculative_serving_gives_the_plain_engines_tokens(monkeypatch):
    """DeepSeek-V3's MTP drafts verified inside the engine (a model whose drafts are often right):
    every request gets the plain engine's tokens, alone or together and with the tokens read at once
    or two steps later; accepted drafts make fewer steps than tokens; a stop token that is the first
    of a step's two tokens ends the request there; max_tokens is exact; no page leaks; nothing
    recompiles."""
    from mtp_utils import good_drafter

    model = vj.load("deepseek-v3-tiny", seed=1)
    model.params = good_drafter(model.params, 0.3)
    config = EngineConfig(num_slots=4, max_len=96, prefill_rows=2, chunk_buckets=(32,))
    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(3, 250, n)) for n in (3, 70, 9, 40, 33, 5)]
    requests = [Request(i, p, int(rng.integers(3, 16))) for i, p in enumerate(prompts)]
    requests.append(Request("hot", prompts[2], 10, SamplingParams(temperature=0.8, top_k=20), seed=5))
    plain_engine = Engine(model, config)
    plain = plain_engine.run(requests)
    # The steps of request 1 alone, speculative: stop it at the first token of a step that emitted two.
    from vishwam_jax.inference import serving

    steps, emitted = [], serving._Dispatched.emitted

    def recording(d):  # each step's tokens of the request (rows with an owner)
        rows = emitted(d)
        steps.extend(r for r, owner in zip(rows, d.owners) if owner is not None and r)
        return rows

    monkeypatch.setattr(serving._Dispatched, "emitted", recording)
    alone = Engine(model, dataclasses.replace(config, speculative=True, lookahead=0)).run(requests[1:2])[1]
    monkeypatch.undo()
    assert alone == plain[1]
    position = 0
    for step in steps:
        if len(step) == 2 and plain[1].index(step[0]) == position:
            break
        position += len(step)
    else:
        raise AssertionError(f"no two-token step with a first-seen first token in {steps}")
    requests.append(Request("stop", prompts[1], len(plain[1]), stop_token_ids=(plain[1][position],)))
    plain["stop"] = plain[1][: position + 1]  # its draft, the step's second token, is dropped
    for lookahead in (0, 2):
        engine = Engine(model, dataclasses.replace(config, speculative=True, lookahead=lookahead))
        together = engine.run(requests)
        assert together == plain, lookahead
        assert all(len(together[r.id]) <= r.max_tokens for r in requests)
        assert 0 < engine.drafts_accepted and engine.steps < plain_engine.steps
        # greedy batches, and batches with the top-k row: one executable per sampling mode
        modes = [("prefill", (2, 32)), ("decode", 4), ("prefill-top_k", (2, 32)), ("decode-top_k", 4)]
        assert sorted(engine.compiles) == sorted(modes) and engine.pages_used == 0
    for r in requests[1:3]:
        assert engine.run([r])[r.id] == plain[r.id]
    # The MTP module's empty rows follow the prefill row bucket too.
    bucketed = Engine(model, dataclasses.replace(config, speculative=True, prefill_buckets=(1, 2)))
    assert bucketed.run(requests) == plain and bucketed.run(requests[:1]) == {0: plain[0]}
    with pytest.raises(ValueError, match="needs a model with an MTP module"):
        Engine(vj.load(vj.get_config("grok-1-tiny", num_layers=1)), EngineConfig(num_slots=4, speculative=True))


@pytest.mark.parametrize("lookahead", [0, 3])
def test_reading_tokens_steps_later_changes_no_output(shakespeare, lookahead):
    """The engine reads a step's tokens `lookahead` steps after dispatching it: requests that stop
    early get extra tokens computed and dropped, and nothing else may change."""
    model, engine = shakespeare
    prompts = [tuple(model.tokenizer.encode(t)) for t in ("KING HENRY.\nWhat", "O Romeo", "Enter the Ghost")]
    free = engine.run([Request("free", prompts[0], 20)])["free"]

    def requests():
        return [
            Request("stop", prompts[0], 20, stop_token_ids=(free[3],)),
            Request("len", prompts[1], 7),
            Request("hot", prompts[2], 12, SamplingParams(temperature=0.9, top_k=40), seed=3),
            Request("cancelled", prompts[1], 20),
        ]

    def serve() -> tuple[dict, int]:
        out = {r.id: [] for r in requests()}
        for r in requests():
            engine.submit(r)
        events = engine.step()
        first_step_events = len(events)
        engine.cancel("cancelled")
        while events or engine.has_work:
            for e in events:
                out[e.request_id].append(e.token)
            events = engine.step() if engine.has_work else []
        return out, first_step_events

    reference, read_at_once = serve()  # the default: one step of lookahead
    default = engine.config
    engine.config = dataclasses.replace(default, lookahead=lookahead)
    try:
        out, first_step_events = serve()
    finally:
        engine.config = default
    # Cancelled after the first step: it has the tokens read by then (none when reading later).
    cancelled = out.pop("cancelled")
    assert reference.pop("cancelled") == [] and cancelled == out["len"][: len(cancelled)]
    assert out == reference and reference["stop"] == free[: free.index(free[3]) + 1]
    # read at once: each request's first token (prefill) and second (the decode step beside it)
    assert (read_at_once, first_step_events) == (0, 8 if lookahead == 0 else 0)
    assert engine.pages_used == 0 and engine.num_running == 0


@pytest.mark.parametrize(
    "name, axes",
    [("gemma-shakespeare", {"data": 2, "fsdp": 4}), ("deepseek-v3-tiny", {"data": 2, "expert": 4})],
)
def test_serving_on_a_mesh_gives_the_single_device_tokens(name, axes):
    """Sharded parameters, steps traced under the mesh (DeepSeek's MoE expert-parallel), the cache
    kept in one layout across steps: the same greedy tokens as one device."""
    from vishwam_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    requests = [Request(i, tuple(int(t) for t in rng.integers(3, 250, n)), 6) for i, n in enumerate([3, 40, 9])]
    config = EngineConfig(num_slots=4, max_len=64, prefill_rows=2, chunk_buckets=(32,))
    alone = Engine(vj.load(name, dtype=np.float32, seed=1), config).run(requests)
    mesh = make_mesh(**axes)
    engine = Engine(vj.load(name, dtype=np.float32, seed=1, mesh=mesh), config, mesh=mesh)
    assert engine.run(requests) == alone
    assert engine.run(requests[:1]) == {0: alone[0]}  # a second round reuses the compiled steps
    assert len(engine.compiles) == 2
    if name == "gemma-shakespeare":  # several decode steps per dispatch: their tokens and counts replicated too
        model = vj.load(name, dtype=np.float32, seed=1, mesh=mesh)
        multi = Engine(model, dataclasses.replace(config, decode_steps=3), mesh=mesh)
        assert multi.run(requests) == alone and multi.run(requests[:1]) == {0: alone[0]}
        assert len(multi.compiles) == 2
    if name == "deepseek-v3-tiny":  # MTP speculative decoding under the mesh: its state keeps its layout too
        model = vj.load(name, dtype=np.float32, seed=1, mesh=mesh)
        speculative = Engine(model, dataclasses.replace(config, speculative=True), mesh=mesh)
        assert speculative.run(requests) == alone and speculative.run(requests[:1]) == {0: alone[0]}
        assert len(speculative.compiles) == 2


def test_several_decode_steps_per_dispatch_change_no_output(shakespeare):
    """decode_steps=4: each decode dispatch runs four steps on the device (one host round trip per
    four tokens per stream). Greedy and seeded outputs, stop tokens and strings, max_tokens that are
    not a multiple of four, a cancellation, and requests alone or together all give what the
    one-step engine gives; the extra tokens past a stop are computed and dropped, and every page
    comes back."""
    model, one_step = shakespeare
    engine = Engine(
        model, dataclasses.replace(one_step.config, decode_steps=4), tokenizer=model.tokenizer
    )  # the fixture's cache layout, four steps per dispatch
    prompts = [tuple(model.tokenizer.encode(t)) for t in ("KING HENRY.\nWhat", "O Romeo", "Enter the Ghost")]
    free = one_step.run([Request("free", prompts[0], 20)])["free"]
    stop_text = model.tokenizer.decode(free)[7:10]
    hot = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    requests = [
        Request("free", prompts[0], 20),
        Request("stop", prompts[0], 20, stop_token_ids=(free[5],)),
        Request("str", prompts[0], 20, stop=(stop_text,)),
        Request("len5", prompts[1], 5),
        Request("len1", prompts[2], 1),
        Request("hot", prompts[2], 13, hot, seed=3),
    ] + [Request(i, p, 6 + 3 * i) for i, p in enumerate(prompts * 3)]
    reference = {r.id: one_step.run([r])[r.id] for r in requests}
    before = engine.steps
    engine.run([requests[0]])
    # The prompt samples token 1 and the decode beside it in the same step starts on the next 19,
    # four at a time: five steps (twenty with one step per dispatch).
    assert engine.steps - before == -(-19 // 4)
    together = engine.run(requests)
    assert together == reference
    assert together["stop"] == free[: free.index(free[5]) + 1] and len(together["len5"]) == 5
    assert {r.id: engine.run([r])[r.id] for r in requests[:6]} == {r.id: reference[r.id] for r in requests[:6]}
    # Cancelled while its four-step dispatch is in flight: it ends with the tokens read so far.
    engine.submit(Request("cancelled", prompts[1], 20))
    engine.step()
    engine.step()
    assert engine.cancel("cancelled").finish_reason == "cancelled"
    while engine.has_work:
        engine.step()
    assert [kind for kind, _ in engine.compiles].count("decode") == 1
    assert engine.pages_used == 0 and engine.num_running == 0
    with pytest.raises(ValueError, match="decode_steps must be a positive integer"):
        EngineConfig(decode_steps=0)
    with pytest.raises(ValueError, match="do not combine"):
        EngineConfig(decode_steps=2, speculative=True)
