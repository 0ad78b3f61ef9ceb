"""Self-speculative greedy decoding with DeepSeek-V3's multi-token-prediction module.

Each step of a row that has emitted tokens up to x_P (x_P itself pending: known, not yet run):
    draft   d = MTP's guess of x_{P+1} (made at the end of the previous step)
    verify  one 2-token forward of the main model over [x_P, d] at positions P, P+1 gives
            g1 = argmax (the true greedy x_{P+1}) and g2 = argmax after d (the true x_{P+2} if d == g1)
    accept  d == g1: emit x_P, d; next pending g2 (P += 2).  Otherwise emit x_P; pending g1 (P += 1).
    draft   the MTP module runs over the entries just confirmed, (h_P, g1) and, if accepted,
            (h_{P+1}, g2), and its last logits give the next draft.
Every emitted token is the main model's own argmax given the emitted prefix, so the output equals
plain greedy decoding; a rejected step costs one 2-token forward instead of a 1-token one.

Rewinding is free: the latent cache is written before it is read and a query at position p reads only
slots <= p (models/mla.py), so the stale slot P+1 left by a rejected draft is overwritten by the next
step's first token before anything can see it; `pos` simply advances by 1 + accepted.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vishwam_jax import models
from vishwam_jax.inference.engine import PromptTooLongError, pad_prompts


@dataclasses.dataclass
class SpeculativeResult:
    tokens: np.ndarray  # [b, max_new_tokens] int32, padded with pad_token_id after each row's EOS
    accepted: int  # drafts accepted over all rows
    drafted: int  # drafts verified over all rows
    steps: int  # 2-token verification forwards (decode loop iterations)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _prefill(graphdef, params, tokens, lengths, *, max_len: int):
    """Main model over the prompts, the first greedy token, then the MTP module over entries
    (h_i, x_{i+1}) of the prompt (the last entry uses the first generated token) for the first draft."""
    model = nnx.merge(graphdef, params)
    dtype = model.embed.embedding.dtype  # the compute dtype (the routers stay float32 whatever it is)
    batch = tokens.shape[0]
    rows = jnp.arange(batch)
    out = model(
        tokens, cache=model.init_cache(batch, max_len, dtype), lengths=lengths, logit_positions=(lengths - 1)[:, None]
    )
    first = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
    following = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).at[rows, lengths - 1].set(first)
    drafted = model.mtp(
        out.hidden, following, cache=model.init_mtp_cache(batch, max_len, dtype), lengths=lengths,
        logit_positions=(lengths - 1)[:, None],
    )  # fmt: skip
    draft = jnp.argmax(drafted.logits[:, 0], axis=-1).astype(jnp.int32)
    return {"cache": out.cache, "mtp_cache": drafted.cache, "token": first, "draft": draft}


def _decode(graphdef, config, params, state, stop_ids, *, max_new_tokens: int):
    model = nnx.merge(graphdef, params)
    pad = config.pad_token_id
    batch = state["token"].shape[0]
    rows = jnp.arange(batch)
    width = max_new_tokens + 1  # a step emits up to 2 tokens, and starts only below max_new_tokens
    carry = {
        **state,
        "out": jnp.full((batch, width), pad, jnp.int32),
        "count": jnp.zeros((batch,), jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "accepted": jnp.int32(0),
        "drafted": jnp.int32(0),
        "steps": jnp.int32(0),
    }

    def live_rows(c):
        return ~c["done"] & (c["count"] < max_new_tokens)

    def body(c):
        live = live_rows(c)
        token, draft = c["token"], c["draft"]
        chunk = jnp.stack([token, draft], axis=1)
        verify = model(chunk, cache=c["cache"], lengths=jnp.where(live, 2, 0))
        greedy = jnp.argmax(verify.logits, axis=-1).astype(jnp.int32)  # [b, 2]
        g1, g2 = greedy[:, 0], greedy[:, 1]
        token_stops = jnp.isin(token, stop_ids)
        verified = live & ~token_stops  # the draft matters only if the row goes on after x_P
        accepted = verified & (draft == g1)
        out = c["out"].at[rows, jnp.where(live, c["count"], width)].set(token, mode="drop")
        out = out.at[rows, jnp.where(accepted, c["count"] + 1, width)].set(draft, mode="drop")
        done = c["done"] | (live & token_stops) | (accepted & jnp.isin(draft, stop_ids))
        advance = jnp.where(live, 1 + accepted.astype(jnp.int32), 0)
        # The verify forward advanced live rows by 2; keep only the confirmed tokens (rewind).
        cache = {**verify.cache, "pos": c["cache"]["pos"] + advance}
        drafted = model.mtp(
            verify.hidden,
            greedy,
            cache=c["mtp_cache"],
            lengths=advance,
            logit_positions=accepted.astype(jnp.int32)[:, None],
        )
        new_draft = jnp.argmax(drafted.logits[:, 0], axis=-1).astype(jnp.int32)
        keep = lambda new, old: jnp.where(live, new, old)  # noqa: E731
        return {
            "cache": cache,
            "mtp_cache": drafted.cache,
            "token": keep(jnp.where(accepted, g2, g1), token),
            "draft": keep(new_draft, draft),
            "out": out,
            "count": c["count"] + advance,
            "done": done,
            "accepted": c["accepted"] + jnp.sum(accepted),
            "drafted": c["drafted"] + jnp.sum(verified),
            "steps": c["steps"] + 1,
        }

    final = jax.lax.while_loop(lambda c: jnp.any(live_rows(c)), body, carry)
    return final["out"][:, :max_new_tokens], final["accepted"], final["drafted"], final["steps"]


class SpeculativeGenerator:
    """Compiled MTP-speculative prefill + decode for one model structure (`graphdef`, from
    nnx.split(module, nnx.Param)), reused across calls; the parameters are passed to `generate`."""

    def __init__(self, graphdef: nnx.GraphDef, config):
        """config: the model's config (pad/eos ids, context length). Raises ValueError for a model
        whose capabilities do not include MTP."""
        # The capabilities of the module `graphdef` describes (a property of the config for
        # DeepSeek-V3), read from its abstract twin: no parameters are needed.
        if not models.abstract(config).capabilities.mtp:
            raise ValueError(
                f"{config.get('name') or config.family}: speculative decoding needs a model with an MTP module"
            )
        self.graphdef = graphdef
        self.config = config
        self._prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnames=("max_len",))
        self._decode = jax.jit(functools.partial(_decode, graphdef, config), static_argnames=("max_new_tokens",))

    def generate(self, params, prompts, max_new_tokens: int) -> SpeculativeResult:
        """Greedy generation for a batch of prompts (lists of ids of any lengths, or [b, t]);
        the tokens equal plain greedy decoding's."""
        config = self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, lengths = pad_prompts(prompts, config.pad_token_id)
        if int(lengths.max()) + max_new_tokens > int(config.max_seq_len):
            raise PromptTooLongError(
                f"prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds the model's "
                f"context of {config.max_seq_len} tokens"
            )
        # The last verify step may write one slot past the final emitted token.
        max_len = max(int(lengths.max()) + max_new_tokens + 1, tokens.shape[1])
        state = self._prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), max_len=max_len)
        stop_ids = jnp.asarray(np.atleast_1d(np.array(config.eos_token_id, np.int32)))
        out, accepted, drafted, steps = self._decode(params, state, stop_ids, max_new_tokens=max_new_tokens)
        return SpeculativeResult(np.asarray(out), int(accepted), int(drafted), int(steps))
