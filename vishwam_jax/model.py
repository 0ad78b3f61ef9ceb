"""The public `Model`: one API for every family (config, params, logits, generate)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.inference.engine import Generator
from vishwam_jax.inference.sampling import SamplingParams
from vishwam_jax.models import family_module


class Model:
    """A model family's forward bound to a config and a parameter pytree.

    model.logits(tokens)                    float32 logits [b, t, vocab] of full sequences
    model.generate(prompts, max_new_tokens) new token ids [b, max_new_tokens] (int32)
    model.generate(..., paged_blocks=N)     the same, with the latent cache in a pool of N 64-token
                                            pages (MLA families: DeepSeek-V3)
    """

    def __init__(self, config, params, tokenizer=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.family = family_module(config)
        self._logits = jax.jit(functools.partial(self._logits_impl))
        self._generator = Generator(self.family, config)
        self._paged_generators: dict[int, Generator] = {}  # one page pool (and its compilations) per size
        self._last_generator = self._generator

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        return f"Model({self.config.get('name') or self.config.family}, {n / 1e6:.1f}M parameters)"

    def _logits_impl(self, params, tokens):
        return self.family.forward(params, tokens, self.config)[0]

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
    ) -> Int[Array, "b n"]:
        """Generate for a batch of prompts (lists of ids, possibly of different lengths, or [b, t]).

        chunk: decode this many tokens per compiled call, handing each block to `on_tokens`.
        paged_blocks: keep the latent cache in a pool of this many 64-token pages
        (inference/paged_cache.py) instead of `batch x (longest prompt + max_new_tokens)` slots:
        each row takes only the pages its own prompt + max_new_tokens need, so a batch mixing short
        and long prompts needs far less cache memory. The tokens are the same as without it. MLA
        families only (DeepSeek-V3; others raise ValueError); a pool too small for the batch raises
        paged_cache.CacheFullError before anything runs. The pages go back to the pool when the call
        returns.
        """
        sampling = SamplingParams(float(temperature), top_k, top_p)
        generator = self._generator if paged_blocks is None else self._paged_generator(paged_blocks)
        self._last_generator = generator
        return generator.generate(
            self.params, prompt_tokens, max_new_tokens, sampling, seed, chunk=chunk, on_tokens=on_tokens
        )

    def _paged_generator(self, blocks) -> Generator:
        if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
            raise ValueError(f"paged_blocks must be a positive number of 64-token pages (or None); got {blocks!r}")
        blocks = int(blocks)
        if blocks not in self._paged_generators:
            try:  # shapes only: nothing is allocated
                jax.eval_shape(lambda: paged_cache.paged_model_cache(self.family, self.config, jnp.zeros((1, 1), jnp.int32), 1, jnp.float32))
            except NotImplementedError:
                name = self.config.get("name") or self.config.family
                raise ValueError(
                    f"paged_blocks: {name} has no paged cache (only MLA latent caches page, i.e. DeepSeek-V3); "
                    "generate without paged_blocks"
                ) from None
            self._paged_generators[blocks] = Generator(self.family, self.config, paged_blocks=blocks)
        return self._paged_generators[blocks]

    @property
    def last_generation_stats(self):
        """Compile, prefill and decode timings of the last `generate` call."""
        return self._last_generator.stats
