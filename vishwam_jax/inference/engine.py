"""Batched generation over any family module: a jitted prefill and a jitted decode loop
(`lax.while_loop`, which stops early once every row has emitted EOS). Both take the parameters
explicitly and merge them with the module's graphdef inside the trace; the cache is data.

Prompts of different lengths are right-padded; each row keeps its own position in the cache, so no
row attends to another's padding and greedy decoding equals argmax over the growing sequence.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.inference.sampling import SamplingParams, sample


class PromptTooLongError(ValueError):
    pass


def pad_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray, pad_id: int, multiple: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of token lists to a common length (rounded up so that prompts of nearby
    lengths share one compiled prefill). Returns tokens [b, t] int32 and lengths [b] int32."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        prompts = [list(row) for row in arr]
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(-(-lengths.max() // multiple) * multiple)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


@struct.dataclass
class DecodeState:
    """What the decode loop carries between compiled calls: the cache, each row's pending token
    (sampled, not yet emitted), which rows have finished, and the sampling key."""

    cache: Any
    token: Int[Array, " b"]
    done: Bool[Array, " b"]
    key: jax.Array
    # Tokens routed to each expert of each MoE layer so far (None for dense models): summed on
    # device in the loop, so collecting load statistics for EPLB costs one [L, E] add per step.
    expert_load: Int[Array, "l e"] | None = None


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last `generate` call; compilation is timed apart from the runs."""

    compile_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    # Tokens per MoE layer and expert over the call (prefill + decode; padding occupies experts
    # too), for sharding.eplb.LoadWindow; None for dense models.
    expert_counts: np.ndarray | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves)


class Generator:
    """Compiled prefill + decode for one model structure (`graphdef`, from nnx.split)."""

    def __init__(self, graphdef: nnx.GraphDef, config, *, cache_dtype=None, paged_blocks: int | None = None):
        """config: the model's config (its pad/eos ids and context length are read from it).
        paged_blocks: keep the cache in a pool of this many 64-token pages (families with a paged
        cache; inference/paged_cache.py): each row of a batch gets the pages its prompt +
        max_new_tokens need instead of the longest row's length."""
        self.graphdef = graphdef
        self.config = config
        self.cache_dtype = cache_dtype
        self.paged = None if paged_blocks is None else paged_cache.PagedCache(paged_blocks)
        self._prefill_jit = jax.jit(self._prefill_impl, static_argnames=("max_len", "sampling"))
        self._decode_jit = jax.jit(self._decode_impl, static_argnames=("steps", "sampling"), donate_argnames=("state",))
        self._executables: dict = {}
        self.stats = GenerationStats()

    def _compiled(self, fn, *args, on_compile: Callable[[str], None] | None = None, **static):
        """Ahead-of-time compile once per argument signature, so runs can be timed without compilation."""
        key = (fn, _signature(args), tuple(sorted(static.items())))
        if key not in self._executables:
            if on_compile is not None:
                on_compile("prefill" if fn is self._prefill_jit else "decode")
            start = time.perf_counter()
            self._executables[key] = fn.lower(*args, **static).compile()
            self.stats.compile_s += time.perf_counter() - start
        return self._executables[key]

    # -- compiled pieces -------------------------------------------------------------------------
    def _prefill_impl(self, params, tokens, lengths, key, block_table=None, *, max_len: int, sampling: SamplingParams):
        dtype = self.cache_dtype or jax.tree_util.tree_leaves(params)[0].dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.bfloat16
        model = nnx.merge(self.graphdef, params)
        if block_table is None:
            cache = model.init_cache(tokens.shape[0], max_len, dtype)
        else:
            cache = model.init_paged_cache(block_table, self.paged.num_blocks, dtype)
        out = model(tokens, cache=cache, lengths=lengths, logit_positions=(lengths - 1)[:, None])
        key, sub = jax.random.split(key)
        first = sample(out.logits[:, 0], sub, sampling)
        cache = out.cache
        done = jnp.zeros_like(first, bool)
        return DecodeState(cache=cache, token=first, done=done, key=key, expert_load=out.expert_counts)

    def _decode_impl(self, params, state, stop_ids, *, steps: int, sampling: SamplingParams):
        """Emit `steps` tokens per row: the pending token first, then one forward per new token.
        Finished rows emit padding and stop advancing."""
        pad = self.config.pad_token_id
        model = nnx.merge(self.graphdef, params)
        batch = state.token.shape[0]
        out = jnp.full((batch, steps), pad, jnp.int32)

        def cond(carry):
            i, state, _ = carry
            return (i < steps) & ~jnp.all(state.done)

        def body(carry):
            i, state, out = carry
            token, done = state.token, state.done
            out = out.at[:, i].set(jnp.where(done, pad, token))
            done = done | jnp.isin(token, stop_ids)
            live = (~done).astype(jnp.int32)
            step = model(token[:, None], cache=state.cache, lengths=live)
            key, sub = jax.random.split(state.key)
            nxt = sample(step.logits[:, -1], sub, sampling)
            load = state.expert_load if step.expert_counts is None else state.expert_load + step.expert_counts
            return i + 1, DecodeState(cache=step.cache, token=nxt, done=done, key=key, expert_load=load), out

        _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
        return out, state

    # -- public ----------------------------------------------------------------------------------
    def generate(
        self,
        params: Any,
        prompts,
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        *,
        chunk: int | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
        on_compile: Callable[[str], None] | None = None,
    ) -> Int[Array, "b n"]:
        """New tokens [b, max_new_tokens] (int32), padded with pad_token_id after each row's EOS.

        chunk: decode this many tokens per compiled call and hand each block to `on_tokens`
        (streaming); default: the whole generation in one call.
        on_compile: called with "prefill" or "decode" before each compilation (which can take seconds).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, lengths = pad_prompts(prompts, self.config.pad_token_id)
        chunk = chunk or max_new_tokens
        steps_total = -(-max_new_tokens // chunk) * chunk
        needed = int(lengths.max()) + steps_total
        limit = int(self.config.max_seq_len)
        if int(lengths.max()) + max_new_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {limit} tokens"
            )
        max_len = max(min(needed, limit), tokens.shape[1])
        self.stats = GenerationStats()
        args = (params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed))
        if self.paged is None:
            return self._generate(args, lengths, max_new_tokens, chunk, max_len, sampling, on_tokens, on_compile)
        # one request id per row; the pages go back to the pool however the call ends
        width = paged_cache.pages_for(max_len)
        rows = [object() for _ in range(len(lengths))]
        try:
            for row, n in zip(rows, lengths):
                self.paged.reserve(row, min(int(n) + steps_total, width * paged_cache.PAGE))
            table = jnp.asarray(self.paged.block_table(rows, width))
            return self._generate(
                args + (table,), lengths, max_new_tokens, chunk, max_len, sampling, on_tokens, on_compile
            )
        finally:
            for row in rows:
                if row in self.paged:
                    self.paged.release(row)

    def _generate(self, args, lengths, max_new_tokens, chunk, max_len, sampling, on_tokens, on_compile=None):
        params = args[0]
        prefill = self._compiled(self._prefill_jit, *args, on_compile=on_compile, max_len=max_len, sampling=sampling)
        start = time.perf_counter()
        state = jax.block_until_ready(prefill(*args))
        self.stats.prefill_s = time.perf_counter() - start
        self.stats.prefill_tokens = int(lengths.sum())
        stop_ids = jnp.asarray(np.atleast_1d(np.array(self.config.eos_token_id, np.int32)))
        decode = self._compiled(
            self._decode_jit, params, state, stop_ids, on_compile=on_compile, steps=chunk, sampling=sampling
        )
        blocks = []
        produced = 0
        start = time.perf_counter()
        while produced < max_new_tokens:
            block, state = decode(params, state, stop_ids)
            block = np.asarray(block)[:, : max_new_tokens - produced]
            blocks.append(block)
            produced += block.shape[1]
            if on_tokens is not None:
                on_tokens(block)
            if bool(np.asarray(state.done).all()):
                break
        self.stats.decode_s = time.perf_counter() - start
        if state.expert_load is not None:
            self.stats.expert_counts = np.asarray(state.expert_load)
        out = np.concatenate(blocks, axis=1)
        # Tokens actually decoded: every emitted token of a row up to and including its EOS.
        self.stats.decode_tokens = int(np.sum(out != self.config.pad_token_id))
        if out.shape[1] < max_new_tokens:
            out = np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=self.config.pad_token_id)
        return jnp.asarray(out)
