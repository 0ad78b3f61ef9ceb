"""The public `Model`: one API for every family (config, params, logits, generate)."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from vishwam_jax.inference.engine import Generator
from vishwam_jax.inference.sampling import SamplingParams
from vishwam_jax.models import family_module


class Model:
    """A model family's forward bound to a config and a parameter pytree.

    model.logits(tokens)                    float32 logits [b, t, vocab] of full sequences
    model.generate(prompts, max_new_tokens) new token ids [b, max_new_tokens] (int32)
    """

    def __init__(self, config, params, tokenizer=None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.family = family_module(config)
        self._logits = jax.jit(functools.partial(self._logits_impl))
        self._generator = Generator(self.family, config)

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
    ) -> Int[Array, "b n"]:
        """Generate for a batch of prompts (lists of ids, possibly of different lengths, or [b, t])."""
        sampling = SamplingParams(float(temperature), top_k, top_p)
        return self._generator.generate(
            self.params, prompt_tokens, max_new_tokens, sampling, seed, chunk=chunk, on_tokens=on_tokens
        )

    @property
    def last_generation_stats(self):
        """Compile, prefill and decode timings of the last `generate` call."""
        return self._generator.stats
