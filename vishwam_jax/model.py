"""The public `Model`: one API for every family (config, module, params, logits, generate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.inference.engine import Generator
from vishwam_jax.inference.sampling import SamplingParams
from vishwam_jax.models import apply
from vishwam_jax.models.interface import CausalLM
from vishwam_jax.models.layers import check_axes


class Model:
    """A family's `nnx.Module`, split once into its structure and its parameters.

    model.module                            the family's nnx.Module (merged on demand from params)
    model.graphdef, model.params            nnx.split(model.module, nnx.Param): what jitted code takes
    model.logits(tokens)                    float32 logits [b, t, vocab] of full sequences
    model.generate(prompts, max_new_tokens) new token ids [b, max_new_tokens] (int32)
    model.generate(..., paged_blocks=N)     the same, with the cache in a pool of N 64-token pages
                                            (families whose capabilities include paged_cache)
    """

    def __init__(self, module: CausalLM, tokenizer=None):
        check_axes(module)
        self.config = module.config
        self.graphdef, self.params = nnx.split(module, nnx.Param)
        self.tokenizer = tokenizer
        graphdef = self.graphdef
        self._logits = jax.jit(lambda params, tokens: apply(graphdef, params, tokens).logits)
        self._generator = Generator(self.graphdef, self.config)
        self._paged_generators: dict[int, Generator] = {}  # one page pool (and its compilations) per size
        self._last_generator = self._generator

    @property
    def module(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.params)

    @property
    def capabilities(self):
        return self.module.capabilities

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        return f"Model({self.config.get('name') or self.config.family}, {n / 1e6:.1f}M parameters)"

    def logits(self, tokens: Int[Array, "b t"] | Sequence[Sequence[int]]) -> Float[Array, "b t v"]:
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds the context of {self.config.max_seq_len}")
        return self._logits(self.params, tokens)

    def generate(
        self,
        prompt_tokens,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        *,
        chunk: int | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
        paged_blocks: int | None = None,
        on_compile: Callable[[str], None] | None = None,
    ) -> Int[Array, "b n"]:
        """Generate for a batch of prompts (lists of ids, possibly of different lengths, or [b, t]).

        chunk: decode this many tokens per compiled call, handing each block to `on_tokens`.
        on_compile: called with "prefill" or "decode" before each compilation (seconds, once per shape).
        paged_blocks: keep the cache in a pool of this many 64-token pages (inference/paged_cache.py)
        instead of `batch x (longest prompt + max_new_tokens)` slots: each row takes only the pages
        its own prompt + max_new_tokens need, so a batch mixing short and long prompts needs far less
        cache memory. The tokens are the same as without it. Every built-in family pages (DeepSeek-V3
        its MLA latents, Gemma its global layers' K/V, Grok-1 every layer's K/V); a family without
        `capabilities.paged_cache` raises ValueError. A pool too small for the batch raises
        paged_cache.CacheFullError before anything runs. The pages go back to the pool when the
        call returns.
        """
        sampling = SamplingParams(float(temperature), top_k, top_p)
        generator = self._generator if paged_blocks is None else self._paged_generator(paged_blocks)
        self._last_generator = generator
        return generator.generate(
            self.params,
            prompt_tokens,
            max_new_tokens,
            sampling,
            seed,
            chunk=chunk,
            on_tokens=on_tokens,
            on_compile=on_compile,
        )

    def _paged_generator(self, blocks) -> Generator:
        if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
            raise ValueError(f"paged_blocks must be a positive number of 64-token pages (or None); got {blocks!r}")
        blocks = int(blocks)
        if not self.capabilities.paged_cache:
            name = self.config.get("name") or self.config.family
            raise ValueError(
                f"paged_blocks: {name} has no paged cache (capabilities.paged_cache is off); "
                "generate without paged_blocks"
            )
        if blocks not in self._paged_generators:
            self._paged_generators[blocks] = Generator(self.graphdef, self.config, paged_blocks=blocks)
        return self._paged_generators[blocks]

    def set_expert_placement(self, placement) -> None:
        """Serve a new EPLB placement (a `sharding.eplb.Placement` or its JSON file) from now on,
        moving the expert weights between slots on device. The model must have been loaded with
        `expert_placement=...` and the slot count must stay the same; nothing is recompiled."""
        from vishwam_jax.sharding.placement import replace_placement

        replace_placement(self, placement)

    @property
    def last_generation_stats(self):
        """Compile, prefill and decode timings of the last `generate` call."""
        return self._last_generator.stats
