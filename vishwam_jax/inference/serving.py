"""Continuous batching: requests join and leave a fixed set of cache slots at every step.

The engine owns one cache of `num_slots` rows (each row one request, with its own position: the
caches already keep per-row positions) for its whole life. Every `step()`:

  1. admits waiting requests, oldest first, into free slots, reserving the cache pages that the
     prompt + max_tokens need (all up front: a running request can never run out of cache, so
     none is ever preempted, and a full cache only makes new requests wait);
  2. runs one prefill chunk: up to `prefill_rows` requests that still have prompt left each
     feed their next piece of at most max(chunk_buckets) tokens, and a request whose prompt is now
     all in the cache samples its first token (a long prompt takes several steps and never stalls
     the running streams for more than one chunk);
  3. runs one decode step: every running request feeds its last token and samples the next;
  4. reads the tokens of an earlier step (`lookahead` steps back) and turns them into events:
     requests that hit a stop token, a stop string or max_tokens leave, and their slot and pages
     are free for the next step.

The host never waits for the step it has just dispatched. Each slot's last token stays on the
device (prefill and decode write it, the next decode reads it), so step n+1 can be dispatched before
step n's tokens reach the host, and the host's bookkeeping for step n (events, stop strings, the
server's streams) runs while the device computes step n+1. Without this the device idles for the
whole host round trip of every step (measured on an H100 with gemma-2b and 64 streams: 6.2 ms per
token at the engine against a 2.97 ms decode step). What it costs: a request that stops on a stop
token or string is known to have stopped only `lookahead` steps later, so up to `lookahead` extra
tokens are computed for it and dropped (max_tokens is known ahead and costs nothing), and each
token's event comes `lookahead` steps after it is sampled.

Several decode steps per dispatch (`EngineConfig.decode_steps`), for when the host's per-step work
(events, stop checks, detokenization, the server's writes) outlasts the device's step. (Measured on
an H100 with gemma-2b and 64 streams: k = 4 gave +37 % while every dispatch waited for its step, see
below, and nothing once it no longer did; the default stays 1.) A dispatch of k steps runs them
in one compiled call (a scan over the decode step, each row stopping at its max_tokens, step i
sampling with counter + i as i more single steps would), so the host's work comes once per k tokens
per stream. Tokens are the one-step engine's, greedy and seeded alike. The cost: a request that stops
on a stop token or string gets up to k - 1 more tokens computed and dropped, and a new prompt waits
up to k device steps for its prefill chunk.

MTP speculative decoding (`EngineConfig.speculative`, DeepSeek-V3): each slot also keeps, on the
device, a draft of the token after its last one (the MTP module's guess) and the count of tokens
left to max_tokens. A decode step feeds [last, draft] to the model; the first position gives the
row's next token g1 (sampled with its own parameters), and a greedy row whose draft equals g1 also
takes the second position's token g2, so it emits 2 tokens in one forward instead of 1. The MTP
module then runs over the confirmed entries to draft the next token; a rejected draft's cache slot
is simply overwritten by the next step. The host learns how many tokens a step emitted only when
it reads the step (`lookahead` steps later), so the device counts down each row's budget and stops
it at max_tokens itself. Every emitted token is the main model's own choice given the tokens
before it, so greedy rows produce what plain greedy decoding produces.

Compiled shapes are bounded: prefill is [r, c] for r in prefill_buckets and c in chunk_buckets,
and decode runs on the first b slots for b in decode_buckets (slots are handed out lowest first),
each in one executable per sampling mode (inference/sampling.py: greedy, temperature, top-k,
nucleus), so nothing compiles in steady state (`compiles` counts them; `warmup(modes)` compiles
them ahead; the server warms every mode). The host picks the mode from the rows' settings, which it
holds anyway. Deciding it on the device took a conditional, and on a GPU a conditional's predicate
travels to the host: every step's dispatch then waited for the step to finish, and no lookahead
could keep the device busy (measured on an H100, gemma-2b, 64 streams: the dispatch call took 5.9
of every 6.3 ms step; served tokens doubled once it was gone, BENCHMARKS.md).

Identical greedy output, alone or among others: a request's numerics must not depend on its
neighbours. Each prompt is cut at the same positions whatever else runs (pieces of
max(chunk_buckets) tokens from position 0) and padded to the bucket of its own piece length; by
default the prefill row count is fixed; sampling draws from each request's own seed. XLA's matmuls
round differently for different batch sizes (measured on CPU: batches of 1-8 rows and 16+ rows differ in
the last bits), so by default decode runs on all slots (decode_buckets = (num_slots,)) and prefill
on prefill_rows rows (prefill_buckets = (prefill_rows,)). Smaller buckets are faster at low load
but their tokens may differ from a lone run's after a near-tie. A prefill step costs its padded
shape, not its real rows: with one bucket, a request that arrives alone pays for prefill_rows
prompts, and every stream already decoding waits for them.

Caches: every family pages (`capabilities.paged_cache`): DeepSeek-V3's MLA latents, Grok-1's K/V
and Gemma's global layers' K/V live in pools of `num_pages` 64-token pages addressed through a block
table (one row per slot), so a short request takes few pages and `num_pages` can be far below
num_slots x max_len: the page count is the cache's real memory. Gemma's sliding-window layers keep a
ring of `sliding_window` slots per slot row (bounded by the window, so paging them would save nothing).
A family without the capability, or `EngineConfig(paged=False)`, keeps one contiguous row of max_len
slots per slot, its pages then only an accounting of the tokens reserved: more memory, and decode
attends over each row in place instead of gathering the row's pages first.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from vishwam_jax.inference import cache_rows, paged_cache
from vishwam_jax.inference.sampling import SamplingParams, sample_rows, sampling_mode
from vishwam_jax.inference.stop_text import StopText
from vishwam_jax.sharding import use_mesh
from vishwam_jax.sharding.mesh import auto_axes


class RequestRejected(ValueError):
    """The request can never run (too long for the context or the cache, malformed)."""


class QueueFull(RuntimeError):
    """Too many requests are already waiting."""


@dataclasses.dataclass(frozen=True)
class Request:
    id: Hashable
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS
    stop: tuple[str, ...] = ()  # stop strings (need the engine's tokenizer)
    ignore_eos: bool = False  # the model's EOS does not end the request (benchmarks: exact lengths)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What decides whether a request can ever run on an engine: plain values, so that a process
    without the model (the HTTP server's) can reject a request before it reaches the engine."""

    vocab_size: int
    max_len: int  # tokens per request, prompt + output
    num_pages: int  # 64-token cache pages in the pool
    has_tokenizer: bool  # stop strings need one
    max_queue: int  # waiting requests before submit raises QueueFull

    def check(self, request: Request) -> None:
        """Raise RequestRejected if `request` can never run."""
        prompt, n = request.prompt, request.max_tokens
        if not prompt:
            raise RequestRejected("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise RequestRejected(f"prompt token ids must be in [0, {self.vocab_size})")
        if not isinstance(n, int) or n < 1:
            raise RequestRejected(f"max_tokens must be a positive integer, got {n!r}")
        if len(prompt) + n > self.max_len:
            raise RequestRejected(
                f"the prompt of {len(prompt)} tokens + max_tokens {n} exceeds the context of {self.max_len} tokens"
            )
        if paged_cache.pages_for(len(prompt) + n) > self.num_pages:
            raise RequestRejected(f"the request needs more than the cache's {self.num_pages} pages")
        if request.stop and not self.has_tokenizer:
            raise RequestRejected("stop strings need a tokenizer")


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step produced for one request.

    token          the generated token id (None when the request ends without one: cancelled, error)
    index          the token's index in the request's output (0: the first token)
    text           text released by this token ("" without a tokenizer; held back near stop strings)
    finish_reason  None while running; "stop" (stop token or string), "length" (max_tokens),
                   "cancelled" or "error" on the request's last event
    """

    request_id: Hashable
    token: int | None
    index: int
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 8  # requests decoded together (a power of two)
    max_len: int | None = None  # tokens per request, prompt + output (default: the model's context)
    prefill_rows: int = 4  # requests prefilled per step
    prefill_buckets: tuple[int, ...] | None = None  # prefill row counts (default: prefill_rows only)
    chunk_buckets: tuple[int, ...] = (16, 64)  # prefill chunk lengths; the largest is the piece size
    decode_buckets: tuple[int, ...] | None = None  # decode batch sizes (default: num_slots only)
    num_pages: int | None = None  # 64-token cache pages (default: every slot full)
    max_queue: int = 1024  # waiting requests before submit raises QueueFull
    lookahead: int = 1  # steps dispatched before the host reads a step's tokens (0: read each at once)
    decode_steps: int = 1  # decode steps per dispatch: tokens per stream per host round trip
    speculative: bool = False  # MTP drafts verified in each decode step (models with an MTP module)
    paged: bool | None = None  # page pools (None: where the family pages) or one contiguous row per slot

    def __post_init__(self):
        def power_of_two(n) -> bool:
            return isinstance(n, int) and n >= 1 and n & (n - 1) == 0

        if not power_of_two(self.num_slots):
            raise ValueError(f"num_slots must be a power of two, got {self.num_slots}")
        if not (isinstance(self.prefill_rows, int) and 1 <= self.prefill_rows <= self.num_slots):
            raise ValueError(f"prefill_rows must be in [1, num_slots], got {self.prefill_rows}")
        rows = self.prefill_buckets or (self.prefill_rows,)
        if self.prefill_rows not in rows or any(
            not isinstance(r, int) or not 1 <= r <= self.prefill_rows for r in rows
        ):
            raise ValueError(f"prefill_buckets must be row counts up to and including prefill_rows, got {rows}")
        if not self.chunk_buckets or any(not isinstance(c, int) or c < 1 for c in self.chunk_buckets):
            raise ValueError(f"chunk_buckets must be positive lengths, got {self.chunk_buckets}")
        buckets = self.decode_buckets or (self.num_slots,)
        if any(not power_of_two(b) or b > self.num_slots for b in buckets) or self.num_slots not in buckets:
            raise ValueError(f"decode_buckets must be powers of two up to and including num_slots, got {buckets}")
        if not (isinstance(self.lookahead, int) and self.lookahead >= 0):
            raise ValueError(f"lookahead must be a non-negative integer, got {self.lookahead}")
        if not (isinstance(self.decode_steps, int) and self.decode_steps >= 1):
            raise ValueError(f"decode_steps must be a positive integer, got {self.decode_steps}")
        if self.decode_steps > 1 and self.speculative:
            raise ValueError("decode_steps > 1 and speculative decoding do not combine (each emits a variable count)")


@dataclasses.dataclass
class _Running:
    """A request's host-side state while it holds a slot."""

    request: Request
    slot: int
    text: StopText | None
    cursor: int = 0  # prompt tokens dispatched to the cache
    generated: list[int] = dataclasses.field(default_factory=list)  # output tokens read back

    @property
    def prefilling(self) -> bool:
        return self.cursor < len(self.request.prompt)


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """One compiled step's sampled tokens (still on the device) and whose they are: row i of
    `tokens` belongs to `owners[i]`, or to nobody (padding, an unfinished prompt chunk). A
    speculative decode step emits `counts[i]` (0 to 2) tokens of row i of `tokens` [rows, 2]."""

    tokens: Int[Array, " rows"] | Int[Array, "rows 2"]
    owners: tuple[_Running | None, ...]
    counts: Int[Array, " rows"] | None = None

    def copy_to_host_async(self) -> None:
        for a in (self.tokens, self.counts):
            if a is not None:
                a.copy_to_host_async()

    def emitted(self) -> list[list[int]]:
        """Each row's emitted tokens."""
        tokens = np.asarray(self.tokens).tolist()
        if self.counts is None:
            return [[t] for t in tokens]
        return [row[:n] for row, n in zip(tokens, np.asarray(self.counts).tolist())]


class _SlotArrays:
    """Per-slot inputs of the compiled steps, kept current as requests are admitted, dispatched and
    leave, so that a step slices arrays instead of rebuilding them from every running request, and
    the host's bookkeeping of a decode dispatch is a few array operations, not a loop over streams.
    Index num_slots is a padding row (a prefill row without a request): greedy, never decoding."""

    def __init__(self, num_slots: int):
        n = num_slots + 1
        self.seeds = np.zeros(n, np.uint32)
        # output tokens whose step has been dispatched (the host may not have them yet): the sampling
        # key's counter
        self.counters = np.zeros(n, np.int32)
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.decoding = np.zeros(n, bool)  # its prompt is in and max_tokens not yet dispatched
        self.remaining = np.zeros(n, np.int32)  # tokens left to max_tokens after those dispatched

    def admit(self, slot: int, request: Request) -> None:
        p = request.sampling
        self.seeds[slot] = request.seed % 2**32
        self.temperature[slot] = p.temperature
        self.top_k[slot] = p.top_k or 0
        self.top_p[slot] = 1.0 if p.top_p is None else p.top_p

    def first_token_dispatched(self, slot: int, max_tokens: int) -> None:
        """The prompt's last chunk, which samples the first token, has been dispatched."""
        self.counters[slot], self.remaining[slot], self.decoding[slot] = 1, max_tokens - 1, max_tokens > 1

    def decode_dispatched(self, bucket: int, steps: int) -> np.ndarray:
        """A decode of up to `steps` tokens per row has been dispatched on the first `bucket` slots;
        returns which of them decoded."""
        live = self.decoding[:bucket].copy()
        emitted = np.where(live, np.minimum(steps, self.remaining[:bucket]), 0)
        self.counters[:bucket] += emitted
        self.remaining[:bucket] -= emitted
        self.decoding[:bucket] &= self.remaining[:bucket] > 0
        return live

    def top_decoding_slot(self) -> int:
        """The highest slot that decodes next, or -1."""
        live = np.flatnonzero(self.decoding[:-1])
        return int(live[-1]) if live.size else -1

    def release(self, slot: int) -> None:
        # Back to greedy: an all-greedy batch skips the sampling sort.
        self.seeds[slot] = self.counters[slot] = self.temperature[slot] = self.top_k[slot] = 0
        self.top_p[slot] = 1.0
        self.decoding[slot] = False
        self.remaining[slot] = 0

    def sampling(self, index) -> tuple[np.ndarray, ...]:
        """Seeds, counters, temperature, top_k, top_p of rows `index` (slot ids or a slice); copies,
        since the host keeps changing these arrays while a step may still read its inputs."""
        return tuple(a[index].copy() for a in (self.seeds, self.counters, self.temperature, self.top_k, self.top_p))

    def live(self, bucket: int) -> np.ndarray:
        return self.decoding[:bucket].copy()

    def budgets(self, bucket: int) -> np.ndarray:
        return self.remaining[:bucket].copy()


class Engine:
    """Continuous batching over one model (see the module docstring). Not thread-safe: one thread
    owns it (inference/engine_thread.py runs it behind a server)."""

    def __init__(
        self, model, config: EngineConfig = EngineConfig(), *, tokenizer=None, cache_dtype=None, mesh=None, rules=None
    ):
        """model: a `vishwam_jax.Model`. tokenizer: decodes output text and enables stop strings.
        mesh, rules: the mesh the model was loaded on (`vj.load(..., mesh=, rules=)`): the steps are
        traced under `use_mesh(mesh, rules)` (activation sharding, expert-parallel MoE) and the cache
        keeps the layout its first step gave it."""
        self.config = config
        self.model_config = model.config
        self.graphdef, self.params = model.graphdef, model.params
        self.tokenizer = tokenizer
        self.max_len = int(config.max_len or model.config.max_seq_len)
        if not 1 <= self.max_len <= model.config.max_seq_len:
            raise ValueError(f"max_len must be in [1, {model.config.max_seq_len}], got {self.max_len}")
        self.num_slots = config.num_slots
        self.decode_buckets = tuple(sorted(config.decode_buckets or (config.num_slots,)))
        self.chunk_buckets = tuple(sorted(config.chunk_buckets))
        self.prefill_buckets = tuple(sorted(config.prefill_buckets or (config.prefill_rows,)))
        self.piece = self.chunk_buckets[-1]
        self.eos_ids = tuple(int(i) for i in np.atleast_1d(np.array(model.config.eos_token_id)))
        self.pad_id = int(model.config.pad_token_id)
        dtype = cache_dtype or jax.tree_util.tree_leaves(self.params)[0].dtype
        self.cache_dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.bfloat16
        self.paged = bool(model.capabilities.paged_cache) if config.paged is None else bool(config.paged)
        if self.paged and not model.capabilities.paged_cache:
            raise ValueError(f"{model.config.get('name') or model.config.family} has no paged cache")
        self.speculative = bool(config.speculative)
        if self.speculative and not model.capabilities.mtp:
            raise ValueError(
                f"{model.config.get('name') or model.config.family}: speculative decoding needs a model with an "
                "MTP module"
            )
        self.table_width = paged_cache.pages_for(self.max_len)
        num_pages = config.num_pages or self.num_slots * self.table_width
        self.pages = paged_cache.PagedCache(num_pages)
        # Each slot's row of the block table; unused entries hold num_pages (writes there are dropped).
        self._table = np.full((self.num_slots, self.table_width), num_pages, np.int32) if self.paged else None
        self._table_on_device = None  # the table as last sent; None after a change (admit, release)
        self._slots = _SlotArrays(self.num_slots)

        self._traced_under = (lambda: use_mesh(mesh, rules)) if mesh is not None else contextlib.nullcontext
        self._replicated = None if mesh is None else NamedSharding(auto_axes(mesh), PartitionSpec())
        with self._traced_under():
            self.axes = cache_rows.batch_axes(lambda batch: self._fresh_cache_fn(batch, self.params))
            self._fresh_cache = jax.jit(self._fresh_cache_fn, static_argnums=0)
            self.cache = self._fresh_cache(self.num_slots, self.params)
            # A reset row for requests that start a slot: every batched leaf as an empty cache has it.
            fresh = self._fresh_cache(config.prefill_rows, self.params)
        self._empty_rows = jax.tree_util.tree_map(
            lambda x, a: jnp.zeros((), x.dtype) if a == cache_rows.SHARED else x, fresh, self.axes
        )
        # Under a mesh the steps keep the cache in the fresh cache's layout and the tokens replicated:
        # a compiled step takes exactly the shardings it was compiled for.
        outputs = decode_outputs = None
        if mesh is not None:
            outputs = (jax.tree_util.tree_map(lambda x: x.sharding, self.cache), self._replicated, self._replicated)
            decode_outputs = outputs + ((self._replicated,) if config.decode_steps > 1 else ())
        static = ("mode",)  # the sampling mode: decided on the host, so no step waits on a device conditional
        self._prefill_jit = jax.jit(
            self._prefill_impl, donate_argnums=(1, 2), static_argnames=static, out_shardings=outputs
        )
        decode = self._decode_impl if config.decode_steps == 1 else self._multi_decode_impl
        self._decode_jit = jax.jit(decode, donate_argnums=(1, 2), static_argnames=static, out_shardings=decode_outputs)
        self._last_tokens = self._fresh_last_tokens()
        self._spec = None  # speculative: {"mtp": MTP cache, "draft": [slots + 1], "budget": [slots + 1]}
        if self.speculative:
            with self._traced_under():
                self.mtp_axes = cache_rows.batch_axes(lambda batch: self._fresh_mtp_cache_fn(batch, self.params))
                self._fresh_mtp_cache = jax.jit(self._fresh_mtp_cache_fn, static_argnums=0)
                self._spec = self._fresh_spec()
                self._mtp_empty_rows = self._fresh_mtp_cache(config.prefill_rows, self.params)
            outputs = None
            if mesh is not None:
                spec_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self._spec)
                outputs = (
                    jax.tree_util.tree_map(lambda x: x.sharding, self.cache), self._replicated, spec_shardings,
                    self._replicated, self._replicated,
                )  # fmt: skip
            self._prefill_jit = jax.jit(
                self._spec_prefill_impl, donate_argnums=(1, 2, 3), static_argnames=static, out_shardings=outputs
            )
            self._decode_jit = jax.jit(
                self._spec_decode_impl, donate_argnums=(1, 2, 3), static_argnames=static, out_shardings=outputs
            )
        self.drafts_accepted = 0  # speculative: tokens that came from an accepted draft
        self._in_flight: collections.deque[list[_Dispatched]] = collections.deque()  # oldest step first
        self._executables: dict = {}
        self.compiles: list[tuple[str, int]] = []  # ("prefill", chunk) / ("decode", batch), in order
        self.compile_s = 0.0

        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[Hashable, _Running] = {}
        self._prefilling: dict[Hashable, _Running] = {}  # the running requests with prompt left, oldest first
        self._slot_owner: list[_Running | None] = [None] * self.num_slots
        self._free_slots = list(range(self.num_slots))  # a heap: lowest slot first keeps decode buckets small
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0

    # -- the cache ---------------------------------------------------------------------------------
    def _module(self, params):
        return nnx.merge(self.graphdef, params)

    def _fresh_cache_fn(self, batch: int, params):
        """An empty cache for `batch` rows in the layout the model returns it (a forward that writes
        nothing: some layouts, e.g. per-layer buffers on GPU, differ between init and output)."""
        model = self._module(params)
        if self.paged:
            table = jnp.full((batch, self.table_width), self.pages.num_blocks, jnp.int32)
            cache = model.init_paged_cache(table, self.pages.num_blocks, self.cache_dtype)
        else:
            cache = model.init_cache(batch, self.max_len, self.cache_dtype)
        tokens = jnp.full((batch, 1), self.pad_id, jnp.int32)
        return model(tokens, cache=cache, lengths=jnp.zeros((batch,), jnp.int32)).cache

    def _fresh_last_tokens(self) -> Int[Array, " slots_and_pad"]:
        """Each slot's last sampled token, on the device (and the padding row's)."""
        return jax.device_put(np.full((self.num_slots + 1,), self.pad_id, np.int32), self._replicated)

    def _fresh_mtp_cache_fn(self, batch: int, params):
        """An empty MTP cache for `batch` rows, in the layout the MTP module returns it."""
        model = self._module(params)
        cache = model.init_mtp_cache(batch, self.max_len, self.cache_dtype)
        hidden = jnp.zeros((batch, 1, self.model_config.d_model), self.cache_dtype)
        tokens = jnp.full((batch, 1), self.pad_id, jnp.int32)
        return model.mtp(hidden, tokens, cache=cache, lengths=jnp.zeros((batch,), jnp.int32)).cache

    def _fresh_spec(self) -> dict:
        """Speculative state: the MTP cache, each slot's draft and its tokens left to max_tokens."""
        per_slot = lambda fill: jax.device_put(np.full((self.num_slots + 1,), fill, np.int32), self._replicated)  # noqa: E731
        return {
            "mtp": self._fresh_mtp_cache(self.num_slots, self.params),
            "draft": per_slot(self.pad_id),
            "budget": per_slot(0),
        }

    # -- compiled steps ----------------------------------------------------------------------------
    def _prefill_impl(
        self,
        params,
        cache,
        last_tokens: Int[Array, " slots_and_pad"],
        empty_rows,
        slots: Int[Array, " p"],
        tokens: Int[Array, "p c"],
        lengths: Int[Array, " p"],
        first: Bool[Array, " p"],
        table: Int[Array, "s mb"] | None,
        seeds: Int[Array, " p"],
        counters: Int[Array, " p"],
        temperature: Float[Array, " p"],
        top_k: Int[Array, " p"],
        top_p: Float[Array, " p"],
        *,
        mode: str,
    ):
        """One chunk for rows `slots` (padding rows: slot num_slots, length 0); a row whose chunk
        starts its prompt (`first`) starts from an empty cache row. Every row's sampled token becomes
        its slot's last token: only a prompt's final chunk's is ever decoded from."""
        model = self._module(params)
        sampling = (seeds, counters, temperature, top_k, top_p)
        out, token = self._chunk_forward(model, cache, empty_rows, slots, tokens, lengths, first, table, sampling, mode)
        return cache_rows.put_rows(cache, self.axes, slots, out.cache), last_tokens.at[slots].set(token), token

    def _chunk_forward(self, model, cache, empty_rows, slots, tokens, lengths, first, table, sampling, mode: str):
        """The model over one prefill chunk of rows `slots` (fresh rows where `first`), and the token
        each row samples after its last position: (output, tokens)."""
        empty_rows = cache_rows.prefix_rows(empty_rows, self.axes, slots.shape[0])  # a smaller row bucket
        rows = cache_rows.select_rows(first, empty_rows, cache_rows.take_rows(cache, self.axes, slots), self.axes)
        if table is not None:
            rows = {**rows, "block_table": jnp.take(table, slots, axis=0, mode="clip")}
        last = jnp.maximum(lengths - 1, 0)[:, None]
        out = model(tokens, cache=rows, lengths=lengths, logit_positions=last)
        return out, sample_rows(out.logits[:, 0], *sampling, mode=mode)

    def _decode_impl(
        self,
        params,
        cache,
        last_tokens: Int[Array, " slots_and_pad"],
        live: Bool[Array, " b"],
        table: Int[Array, "s mb"] | None,
        seeds: Int[Array, " b"],
        counters: Int[Array, " b"],
        temperature: Float[Array, " b"],
        top_k: Int[Array, " b"],
        top_p: Float[Array, " b"],
        *,
        mode: str,
    ):
        """One token for each of the first b slots (b = the bucket), fed each slot's last token;
        idle slots write nothing and keep their last token."""
        model = self._module(params)
        bucket = live.shape[0]
        tokens = last_tokens[:bucket]
        rows = cache_rows.prefix_rows(cache, self.axes, bucket)
        if table is not None:
            rows = {**rows, "block_table": table[:bucket]}
        out = model(tokens[:, None], cache=rows, lengths=live.astype(jnp.int32))
        token = sample_rows(out.logits[:, -1], seeds, counters, temperature, top_k, top_p, mode=mode)
        last_tokens = last_tokens.at[:bucket].set(jnp.where(live, token, tokens))
        return cache_rows.put_prefix_rows(cache, self.axes, out.cache), last_tokens, token

    def _multi_decode_impl(
        self,
        params,
        cache,
        last_tokens: Int[Array, " slots_and_pad"],
        live: Bool[Array, " b"],
        budgets: Int[Array, " b"],
        table: Int[Array, "s mb"] | None,
        seeds: Int[Array, " b"],
        counters: Int[Array, " b"],
        *sampling,
        mode: str,
    ):
        """`decode_steps` of `_decode_impl` in one call: step i runs the rows still under their
        budget (tokens left to max_tokens), with sampling counter `counters + i`, which is what i
        more single steps would use. Returns tokens [b, decode_steps] and counts [b]."""

        def step(carry, i):
            cache, last_tokens = carry
            cache, last_tokens, token = self._decode_impl(
                params, cache, last_tokens, live & (i < budgets), table, seeds, counters + i, *sampling, mode=mode
            )
            return (cache, last_tokens), token

        steps = jnp.arange(self.config.decode_steps, dtype=jnp.int32)
        (cache, last_tokens), tokens = jax.lax.scan(step, (cache, last_tokens), steps)
        counts = jnp.where(live, jnp.minimum(budgets, self.config.decode_steps), 0)
        return cache, last_tokens, tokens.T, counts

    def _spec_prefill_impl(
        self,
        params,
        cache,
        last_tokens: Int[Array, " slots_and_pad"],
        spec: dict,
        empty_rows,
        mtp_empty_rows,
        slots: Int[Array, " p"],
        tokens: Int[Array, "p c"],
        lengths: Int[Array, " p"],
        first: Bool[Array, " p"],
        final: Bool[Array, " p"],
        next_first: Int[Array, " p"],
        budgets: Int[Array, " p"],
        table: Int[Array, "s mb"] | None,
        *sampling,
        mode: str,
    ):
        """`_prefill_impl`, then the MTP module over the chunk's entries (h_i, x_{i+1}): the last
        entry pairs with the next piece's first token (`next_first`), or, when the prompt ends in this
        chunk (`final`), with the token just sampled, whose MTP logits give the first draft. A final
        row's budget becomes `budgets` (max_tokens - 1: the first token is out)."""
        model = self._module(params)
        out, token = self._chunk_forward(model, cache, empty_rows, slots, tokens, lengths, first, table, sampling, mode)
        last = jnp.maximum(lengths - 1, 0)
        following = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        following = following.at[jnp.arange(tokens.shape[0]), last].set(jnp.where(final, token, next_first))
        mtp_rows = cache_rows.take_rows(spec["mtp"], self.mtp_axes, slots)
        mtp_empty_rows = cache_rows.prefix_rows(mtp_empty_rows, self.mtp_axes, slots.shape[0])
        mtp_rows = cache_rows.select_rows(first, mtp_empty_rows, mtp_rows, self.mtp_axes)
        drafted = model.mtp(out.hidden, following, cache=mtp_rows, lengths=lengths, logit_positions=last[:, None])
        draft = jnp.argmax(drafted.logits[:, 0], axis=-1).astype(jnp.int32)
        spec = {
            "mtp": cache_rows.put_rows(spec["mtp"], self.mtp_axes, slots, drafted.cache),
            "draft": spec["draft"].at[slots].set(draft),
            "budget": spec["budget"].at[slots].set(jnp.where(final, budgets, spec["budget"][slots])),
        }
        cache = cache_rows.put_rows(cache, self.axes, slots, out.cache)
        return cache, last_tokens.at[slots].set(token), spec, token, None

    def _spec_decode_impl(
        self,
        params,
        cache,
        last_tokens: Int[Array, " slots_and_pad"],
        spec: dict,
        live: Bool[Array, " b"],
        table: Int[Array, "s mb"] | None,
        seeds: Int[Array, " b"],
        counters: Int[Array, " b"],
        temperature: Float[Array, " b"],
        top_k: Int[Array, " b"],
        top_p: Float[Array, " b"],
        *,
        mode: str,
    ):
        """One verify step for the first b slots: [last, draft] through the model, g1 sampled from
        the first position (the row's own parameters), g2 the second position's argmax, kept when the
        row is greedy and its draft was g1; then the MTP module over the confirmed entries drafts the
        next token. Rows with no budget left emit nothing. Returns tokens [b, 2] and counts [b]."""
        model = self._module(params)
        bucket = live.shape[0]
        pending, draft, budget = last_tokens[:bucket], spec["draft"][:bucket], spec["budget"][:bucket]
        live = live & (budget > 0)
        rows = cache_rows.prefix_rows(cache, self.axes, bucket)
        if table is not None:
            rows = {**rows, "block_table": table[:bucket]}
        verify = model(jnp.stack([pending, draft], axis=1), cache=rows, lengths=jnp.where(live, 2, 0))
        g1 = sample_rows(verify.logits[:, 0], seeds, counters, temperature, top_k, top_p, mode=mode)
        g2 = jnp.argmax(verify.logits[:, 1], axis=-1).astype(jnp.int32)
        accepted = live & (temperature == 0) & (draft == g1) & (budget >= 2)
        counts = jnp.where(live, 1 + accepted.astype(jnp.int32), 0)
        # The verify forward advanced live rows by 2; keep only the confirmed tokens (a rejected
        # draft's slot is overwritten by the next step before anything reads it).
        new_cache = {**verify.cache, "pos": rows["pos"] + counts}
        emitted = jnp.stack([g1, g2], axis=1)
        mtp_rows = cache_rows.prefix_rows(spec["mtp"], self.mtp_axes, bucket)
        drafted = model.mtp(
            verify.hidden, emitted, cache=mtp_rows, lengths=counts, logit_positions=accepted.astype(jnp.int32)[:, None]
        )
        new_draft = jnp.argmax(drafted.logits[:, 0], axis=-1).astype(jnp.int32)
        newest = jnp.where(accepted, g2, g1)
        spec = {
            "mtp": cache_rows.put_prefix_rows(spec["mtp"], self.mtp_axes, drafted.cache),
            "draft": spec["draft"].at[:bucket].set(jnp.where(live, new_draft, draft)),
            "budget": spec["budget"].at[:bucket].set(budget - counts),
        }
        last_tokens = last_tokens.at[:bucket].set(jnp.where(live, newest, pending))
        return cache_rows.put_prefix_rows(cache, self.axes, new_cache), last_tokens, spec, emitted, counts

    def _run(self, kind: str, size: int | tuple[int, ...], fn, *args, mode: str):
        # (kind, size) fixes every argument's shape (decode: the batch bucket; prefill: rows and
        # chunk length; the slot count and cache layout never change), so the key skips flattening
        # the cache tree on every step; the compiled call still rejects a mismatched argument. Each
        # sampling mode is its own executable.
        key = (kind, size, mode)
        if key not in self._executables:
            start = time.perf_counter()
            with self._traced_under():
                self._executables[key] = fn.lower(*args, mode=mode).compile()
            self.compile_s += time.perf_counter() - start
            self.compiles.append((kind if mode == "greedy" else f"{kind}-{mode}", size))
        return self._executables[key](*args)

    def _device_table(self):
        """The block table, sent to the device again only after it changed."""
        if self._table is not None and self._table_on_device is None:
            # a copy: on CPU a device array may alias the numpy memory, which admit/release rewrite
            self._table_on_device = jnp.array(self._table, copy=True)
        return self._table_on_device

    def warmup(self, modes: Sequence[str] = ("greedy",)) -> None:
        """Compile every prefill chunk and decode batch bucket now, for each sampling mode in `modes`
        (SAMPLING_MODES; the others compile when a batch first needs them), so that requests never
        wait on XLA."""
        for mode in modes:
            for p, c in itertools.product(self.prefill_buckets, self.chunk_buckets):
                tokens = np.full((p, c), self.pad_id, np.int32)
                padding, nothing = np.full(p, self.num_slots, np.int32), np.zeros(p, np.int32)
                self._prefill(padding, tokens, nothing, np.ones(p, bool), nothing, np.full(p, -1, np.int32), mode)
            for b in self.decode_buckets:
                self._decode(b, mode)  # no slot is live: writes nothing

    def _prefill(self, slots, tokens, lengths, first, next_first, budgets, mode=None) -> Int[Array, " p"]:
        """One prefill chunk. next_first: the token after each row's piece, or pad where the prompt
        ends with it; budgets: max_tokens - 1 where it ends, -1 elsewhere (speculative only). mode:
        the sampling mode (default: what the rows need)."""
        table, sampling = self._device_table(), self._slots.sampling(slots)
        mode = mode or sampling_mode(*sampling[2:])
        if self.speculative:
            final = budgets >= 0
            self.cache, self._last_tokens, self._spec, sampled, _ = self._run(
                "prefill", tokens.shape, self._prefill_jit, self.params, self.cache, self._last_tokens,
                self._spec, self._empty_rows, self._mtp_empty_rows, slots, tokens, lengths, first, final,
                next_first, budgets, table, *sampling, mode=mode,
            )  # fmt: skip
            return sampled
        self.cache, self._last_tokens, sampled = self._run(
            "prefill", tokens.shape, self._prefill_jit, self.params, self.cache, self._last_tokens,
            self._empty_rows, slots, tokens, lengths, first, table, *sampling, mode=mode,
        )  # fmt: skip
        return sampled

    def _decode(self, bucket: int, mode: str | None = None) -> tuple[Array, Array | None]:
        """One decode step on the first `bucket` slots, from each slot's last token: (tokens, None);
        speculative (tokens [b, 2], counts [b]); or decode_steps of them (tokens [b, steps], counts [b])."""
        sampling = self._slots.sampling(slice(0, bucket))
        mode = mode or sampling_mode(*sampling[2:])
        args = (self._slots.live(bucket), self._device_table(), *sampling)
        if self.config.decode_steps > 1:
            args = (args[0], self._slots.budgets(bucket), *args[1:])
            self.cache, self._last_tokens, sampled, counts = self._run(
                "decode", bucket, self._decode_jit, self.params, self.cache, self._last_tokens, *args, mode=mode
            )
            return sampled, counts
        if self.speculative:
            self.cache, self._last_tokens, self._spec, sampled, counts = self._run(
                "decode", bucket, self._decode_jit, self.params, self.cache, self._last_tokens, self._spec, *args,
                mode=mode,
            )  # fmt: skip
            return sampled, counts
        self.cache, self._last_tokens, sampled = self._run(
            "decode", bucket, self._decode_jit, self.params, self.cache, self._last_tokens, *args, mode=mode
        )
        return sampled, None

    # -- requests ----------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def pages_used(self) -> int:
        return self.pages.num_blocks - self.pages.allocator.num_free

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._in_flight)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(
            vocab_size=int(self.model_config.vocab_size),
            max_len=self.max_len,
            num_pages=self.pages.num_blocks,
            has_tokenizer=self.tokenizer is not None,
            max_queue=self.config.max_queue,
        )

    def check(self, request: Request) -> None:
        """Raise RequestRejected if `request` can never run here (safe to call from any thread)."""
        self.limits.check(request)

    def submit(self, request: Request) -> None:
        """Queue a request; raises RequestRejected (never runnable) or QueueFull."""
        self.check(request)
        if request.id in self._running or any(r.id == request.id for r in self._waiting):
            raise RequestRejected(f"request id {request.id!r} is already in use")
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting")
        self._waiting.append(request)

    def cancel(self, request_id: Hashable) -> Event | None:
        """Stop a request (waiting or running) and free its slot and pages; None if it is unknown
        (e.g. already finished)."""
        for r in self._waiting:
            if r.id == request_id:
                self._waiting.remove(r)
                return Event(request_id, None, 0, "", "cancelled")
        state = self._running.get(request_id)
        if state is None:
            return None
        self._release(state)
        return Event(request_id, None, len(state.generated), "", "cancelled")

    def cancel_all(self, reason: str = "cancelled") -> list[Event]:
        events = [Event(r.id, None, 0, "", reason) for r in self._waiting]
        self._waiting.clear()
        for state in list(self._running.values()):
            self._release(state)
            events.append(Event(state.request.id, None, len(state.generated), "", reason))
        return events

    def reset(self) -> list[Event]:
        """End every request ("error") and start again from an empty cache (after a failed step:
        the cache it was given is donated, so it may be gone)."""
        events = self.cancel_all("error")
        self._in_flight.clear()
        with self._traced_under():
            self.cache = self._fresh_cache(self.num_slots, self.params)
            if self.speculative:
                self._spec = self._fresh_spec()
        self._last_tokens = self._fresh_last_tokens()
        return events

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            request = self._waiting[0]
            try:
                pages = self.pages.reserve(request.id, len(request.prompt) + request.max_tokens)
            except paged_cache.CacheFullError:
                return  # oldest first: later requests wait behind it rather than starve it
            self._waiting.popleft()
            slot = heapq.heappop(self._free_slots)
            if self._table is not None:
                self._table[slot] = self.pages.num_blocks
                self._table[slot, : len(pages)] = pages
                self._table_on_device = None
            self._slots.admit(slot, request)
            text = None if self.tokenizer is None else StopText(self.tokenizer.decode, request.stop)
            state = _Running(request, slot, text)
            self._running[request.id] = self._prefilling[request.id] = self._slot_owner[slot] = state

    def _release(self, state: _Running) -> None:
        del self._running[state.request.id]
        self._prefilling.pop(state.request.id, None)
        self._slot_owner[state.slot] = None
        self.pages.release(state.request.id)
        if self._table is not None:
            self._table[state.slot] = self.pages.num_blocks
            self._table_on_device = None
        self._slots.release(state.slot)
        heapq.heappush(self._free_slots, state.slot)

    def _emit(self, state: _Running, token: int) -> Event:
        """Record a generated token and end the request if it meets a stop condition."""
        request = state.request
        index = len(state.generated)
        state.generated.append(token)
        self.tokens_generated += 1
        reason = None
        if (token in self.eos_ids and not request.ignore_eos) or token in request.stop_token_ids:
            reason = "stop"
        text = ""
        if state.text is not None:
            if reason is None:
                text = state.text.add(token)
                if state.text.stopped:
                    reason = "stop"
        if reason is None and len(state.generated) >= request.max_tokens:
            reason = "length"
        if reason is not None:
            if state.text is not None:
                text += state.text.finish()
            self._release(state)
        return Event(request.id, token, index, text, reason)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit, dispatch one prefill chunk and one decode step, and read back the steps dispatched
        more than `lookahead` steps ago (all of them once nothing is left to dispatch); the events
        of the tokens read."""
        self._admit()
        dispatched = [d for d in (self._dispatch_prefill(), self._dispatch_decode()) if d is not None]
        for d in dispatched:
            d.copy_to_host_async()  # the copy starts as soon as the step ends
        if dispatched:
            self._in_flight.append(dispatched)
            self.steps += 1
        keep = self.config.lookahead if dispatched else 0
        events = []
        while len(self._in_flight) > keep:
            events += self._read(self._in_flight.popleft())
        return events

    def _read(self, step: list[_Dispatched]) -> list[Event]:
        events = []
        for d in step:
            for state, tokens in zip(d.owners, d.emitted()):
                for i, token in enumerate(tokens):
                    # A request that stopped, or was cancelled, after this step was dispatched is gone.
                    if state is None or self._running.get(state.request.id) is not state:
                        break
                    events.append(self._emit(state, token))
                    if self.speculative:
                        self.drafts_accepted += i  # a speculative step's second token was its draft
        return events

    def _bucket(self, n: int) -> int:
        return next(c for c in self.chunk_buckets if c >= n)

    def _dispatch_prefill(self) -> _Dispatched | None:
        pending = list(self._prefilling.values())
        if not pending:
            return None

        def key(s: _Running) -> tuple[int, bool]:
            # Rows of one chunk share its padded length (that of each request's own piece, so that
            # its numerics never depend on the others) and whether they start their prompt (MLA
            # chooses its form for the whole chunk by that).
            n = min(self.piece, len(s.request.prompt) - s.cursor)
            return self._bucket(n), s.cursor == 0

        group = [s for s in pending if key(s) == key(pending[0])][: self.config.prefill_rows]
        rows = next(r for r in self.prefill_buckets if r >= len(group))
        width = key(pending[0])[0]
        slots = np.full(rows, self.num_slots, np.int32)
        tokens = np.full((rows, width), self.pad_id, np.int32)
        lengths = np.zeros(rows, np.int32)
        first = np.ones(rows, bool)
        next_first = np.full(rows, self.pad_id, np.int32)
        budgets = np.full(rows, -1, np.int32)  # -1: the prompt goes on after this chunk
        for i, s in enumerate(group):
            prompt = s.request.prompt
            piece = prompt[s.cursor : s.cursor + self.piece]
            slots[i], lengths[i], first[i] = s.slot, len(piece), s.cursor == 0
            tokens[i, : len(piece)] = piece
            end = s.cursor + len(piece)
            if end < len(prompt):
                next_first[i] = prompt[end]
            else:  # the prompt ends here: this chunk samples the first token
                budgets[i] = s.request.max_tokens - 1
        sampled = self._prefill(slots, tokens, lengths, first, next_first, budgets)
        owners: list[_Running | None] = [None] * rows
        for i, s in enumerate(group):
            s.cursor += int(lengths[i])
            self.prompt_tokens += int(lengths[i])
            if not s.prefilling:  # the prompt is in: this chunk sampled its first token
                owners[i] = s
                del self._prefilling[s.request.id]
                self._slots.first_token_dispatched(s.slot, s.request.max_tokens)
        return _Dispatched(sampled, tuple(owners))

    def _dispatch_decode(self) -> _Dispatched | None:
        top = self._slots.top_decoding_slot()
        if top < 0:
            return None
        bucket = next(b for b in self.decode_buckets if b > top)
        sampled, counts = self._decode(bucket)
        # At least one token per step (speculative: up to two; the device stops at max_tokens);
        # decode_steps tokens, or those left to max_tokens.
        live = self._slots.decode_dispatched(bucket, self.config.decode_steps)
        owners = tuple(s if d else None for s, d in zip(self._slot_owner[:bucket], live.tolist()))
        return _Dispatched(sampled, owners, counts)

    def run(self, requests: Sequence[Request], on_event: Callable[[Event], None] | None = None) -> dict:
        """Serve `requests` to the end (all submitted now); returns {id: generated token ids}."""
        out: dict[Hashable, list[int]] = {}
        for r in requests:
            self.submit(r)
            out[r.id] = []
        while self.has_work:
            for e in self.step():
                if e.token is not None:
                    out[e.request_id].append(e.token)
                if on_event is not None:
                    on_event(e)
        return out
