"""DeepSeek-V3 (arXiv:2412.19437), in the order the paper presents it.

    x = embed(tokens)                                           # untied input/output embeddings
    for layer i:  x += mla(rms_norm(x))                         # §2.1.1 multi-head latent attention
                  x += ffn_i(rms_norm(x))                       # SwiGLU for i < num_dense_layers,
                                                                # else §2.1.2 DeepSeekMoE
    h = rms_norm(x);  logits = h @ W_out

    DeepSeekMoE(u) = shared(u) + sum_{e in topk} g_e * expert_e(u)        # SwiGLU experts
        s = sigmoid(u @ W_router)                               # affinities, float32
        topk chosen on s + b (b: the aux-loss-free balancing bias, §2.1.2), restricted to the
        num_groups_per_token groups with the largest sum of their two best biased scores
        g = s[topk] / sum(s[topk]) * routed_scaling_factor     # the bias never enters a gate

    MTP (§2.2), depth k = 1..D, for entry i:                    # predicts t_{i+k+1}
        h^k_i = norm_k(block_k(W_eh [enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)]))
        logits^k_i = h^k_i @ W_out                              # embedding and head shared
    where h^0 is the main model's final (normed) hidden state, as transformers and vLLM feed it.

All norms are RMSNorm multiplying by `w` itself (not Gemma's 1 + w).

Parameters (module attribute paths, each weight a Linear's `.kernel` [in, out], each norm's `.scale`;
every parameter of a stack has its layers on a leading axis, or per-layer buffers for GPU serving,
models/stack.py):
    embed.embedding [V, d]   final_norm.scale [d]   lm_head.kernel [d, V]
    dense_layers (num_dense_layers): attn_norm, attn {models/mla.py}, mlp_norm, mlp.{gate, up [d, f], down [f, d]}
    moe_layers (num_layers - num_dense_layers): attn_norm, attn, mlp_norm,
        router.{kernel [d, E], bias [E]} (float32), experts.{gate, up [E, d, fe], down [E, fe, d]},
        shared.{gate, up [d, fe * shared], down [fe * shared, d]}
    mtp_layers (num_mtp_layers): enorm, hnorm [d], eh_proj [2d, d], block {one MoE layer}, norm [d]
Cache: {"pos": [b] next position per row, "dense_layers": {"kv": [Ld, b, max_len, kv_lora + rope]},
"moe_layers": {"kv": [Lm, b, max_len, kv_lora + rope]}}; paged (`init_paged_cache`): each "kv" a
stacked page pool [L, num_blocks, page, kv_lora + rope] and one "block_table" [b, max_blocks] for
every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from vishwam_jax.inference import paged_cache
from vishwam_jax.models import stack
from vishwam_jax.models.interface import Cache, Capabilities, ForwardOutput, chunk_lengths, chunk_positions
from vishwam_jax.models.layers import Embed, GatedMLP, Linear, RMSNorm
from vishwam_jax.models.mla import MLA, init_cache_layer, latent_width
from vishwam_jax.models.moe import Experts, GroupedSigmoidRouter
from vishwam_jax.models.remat import policy_of
from vishwam_jax.quantization import Quantization


# -- blocks ----------------------------------------------------------------------------------------
class DecoderLayer(nnx.Module):
    """Pre-norm residual block: MLA (naive form without a cache, absorbed over the latent cache
    with one), then the dense SwiGLU (`mlp`) or DeepSeekMoE (`router`, `experts`, `shared`)."""

    def __init__(self, config, *, moe: bool, rngs: nnx.Rngs, dtype=jnp.float32, slots: int = 0):
        d, eps, act = config.d_model, config.norm_eps, config.activation
        quantization = Quantization.of(config)
        self.attn_norm = RMSNorm(d, eps=eps, dtype=dtype)
        self.attn = MLA(config, rngs=rngs, dtype=dtype)
        self.mlp_norm = RMSNorm(d, eps=eps, dtype=dtype)
        if not moe:
            self.mlp = GatedMLP(d, config.ffn_dim, act, rngs=rngs, dtype=dtype, quantization=quantization)
            self.router = self.experts = self.shared = None
            return
        self.mlp = None
        # Routing is done in float32 whatever the weights (the release keeps gate and bias in float32).
        self.router = GroupedSigmoidRouter(
            d, config.num_experts, config.num_experts_per_token,
            num_groups=config.num_expert_groups, topk_groups=config.num_groups_per_token,
            routed_scaling_factor=config.routed_scaling_factor, renormalize=config.norm_topk_prob, rngs=rngs,
        )  # fmt: skip
        self.experts = Experts(
            config.num_experts, d, config.moe_ffn_dim, act,
            rngs=rngs, dtype=dtype, quantization=quantization, num_slots=slots,
        )  # fmt: skip
        fs = config.moe_ffn_dim * config.num_shared_experts
        self.shared = GatedMLP(d, fs, act, rngs=rngs, dtype=dtype, quantization=quantization)

    def moe(self, x: Float[Array, "b t d"]) -> tuple[Float[Array, "b t d"], Int[Array, " e"]]:
        """DeepSeekMoE: group-limited sigmoid routing (bias for selection only) through the shared
        sorted dispatch, plus the always-on shared expert. Also the tokens routed to each expert."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        gates, chosen = self.router(flat)
        routed, counts = self.experts(flat, gates, chosen)
        return (routed + self.shared(flat)).reshape(b, t, d), counts

    def __call__(
        self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], lengths: Int[Array, " b"], cache: dict | None
    ) -> tuple[Float[Array, "b t d"], dict | None, Int[Array, " e"] | None]:
        """(x, cache, expert counts or None for a dense layer)."""
        a, cache = self.attn(self.attn_norm(x), positions, lengths, cache)
        x = x + a
        h = self.mlp_norm(x)
        if self.mlp is not None:
            return x + self.mlp(h), cache, None
        m, counts = self.moe(h)
        return x + m, cache, counts


class MTP(nnx.Module):
    """One multi-token-prediction depth (§2.2): h' = norm(block(W_eh [enorm(e) ; hnorm(h)]))."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, eps = config.d_model, config.norm_eps
        self.enorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps=eps, dtype=dtype)
        self.eh_proj = Linear(
            (2 * d, d), (None, "embed"), "btc,cd->btd",
            rngs=rngs, fan_in=2 * d, dtype=dtype, quantization=Quantization.of(config),
        )  # fmt: skip
        self.block = DecoderLayer(config, moe=True, rngs=rngs, dtype=dtype)
        self.norm = RMSNorm(d, eps=eps, dtype=dtype)


# -- the model -------------------------------------------------------------------------------------
class DeepSeekV3(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        d, v = config.d_model, config.vocab_size
        num_dense, num_moe = config.num_dense_layers, config.num_layers - config.num_dense_layers
        self.embed = Embed(v, d, rngs=rngs, dtype=dtype, init_std_fan_in=1)  # unit entries: not scaled
        self.dense_layers = (
            stack.stacked(num_dense, lambda r: DecoderLayer(config, moe=False, rngs=r, dtype=dtype), rngs)
            if num_dense
            else None
        )
        slots = config.num_expert_slots
        self.moe_layers = (
            # Only the main MoE layers take an expert placement (the MTP block keeps one slot per expert).
            stack.stacked(num_moe, lambda r: DecoderLayer(config, moe=True, rngs=r, dtype=dtype, slots=slots), rngs)
            if num_moe
            else None
        )
        self.final_norm = RMSNorm(d, eps=config.norm_eps, dtype=dtype)
        # The output embedding stays float, as the release keeps it (bf16), like the input embedding.
        self.lm_head = Linear((d, v), ("embed", "vocab"), "btd,dv->btv", rngs=rngs, fan_in=d, dtype=dtype)
        depths = config.num_mtp_layers
        self.mtp_layers = stack.stacked(depths, lambda r: MTP(config, rngs=r, dtype=dtype), rngs) if depths else None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(mtp=self.config.num_mtp_layers > 0, paged_cache=True, moe=True)

    def _stacks(self) -> list[tuple[str, int]]:
        c = self.config
        stacks = [("dense_layers", c.num_dense_layers), ("moe_layers", c.num_layers - c.num_dense_layers)]
        return [(name, depth) for name, depth in stacks if depth]

    # -- caches ------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
        """The latent cache: kv_lora_rank + qk_rope_head_dim values per token per layer (576 for the
        released model: ~70 KB per token in bf16 over 61 layers, against ~5 MB for per-head K/V)."""
        one = init_cache_layer(self.config, batch, max_len, dtype)["kv"]
        cache: Cache = {"pos": jnp.zeros((batch,), jnp.int32)}
        for name, depth in self._stacks():
            cache[name] = {"kv": jnp.broadcast_to(one, (depth, *one.shape))}
        return cache

    def init_paged_cache(self, block_table: Int[Array, "b mb"], num_blocks: int, dtype=jnp.bfloat16) -> Cache:
        """The latent cache in page pools (inference/paged_cache.py): per stack [L, num_blocks, page,
        576], read through one block table for every layer (a sequence's page k is the same id in
        each layer's pool)."""
        table = jnp.asarray(block_table, jnp.int32)
        pool = paged_cache.init_pool(num_blocks, latent_width(self.config), dtype)
        cache: Cache = {"pos": jnp.zeros((table.shape[0],), jnp.int32), "block_table": table}
        for name, depth in self._stacks():
            cache[name] = {"kv": jnp.broadcast_to(pool, (depth, *pool.shape))}
        return cache

    def init_mtp_cache(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
        """The latent cache of one MTP depth's block (the layout of one main layer's)."""
        return {"pos": jnp.zeros((batch,), jnp.int32), "block": init_cache_layer(self.config, batch, max_len, dtype)}

    # -- forward -----------------------------------------------------------------------------------
    def _run_stack(
        self, layers: DecoderLayer, name: str, x: Float[Array, "b t d"], positions, lengths, cache: Cache | None
    ) -> tuple[Float[Array, "b t d"], dict | None, Int[Array, "l e"] | None]:
        """One stack under lax.scan (or unrolled over per-layer buffers, models/stack.py): (x, its new
        cache, per-layer expert counts or None). A paged stack's pools are carried through the loop
        and written in place (stack.scan_paged)."""

        def body(layer: DecoderLayer, x, layer_cache):
            return layer(x, positions, lengths, layer_cache)

        return stack.scan_paged(
            layers,
            x,
            None if cache is None else cache[name],
            body,
            block_table=None if cache is None else cache.get("block_table"),
            paged=True,
            remat_policy=policy_of(self.config),
            unroll=self.config.scan_unroll,
        )

    def _logits(self, h: Float[Array, "b t d"], logit_positions: Int[Array, "b k"] | None) -> Float[Array, "b k v"]:
        if logit_positions is not None:
            h = jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
        return self.unembed(h)

    def unembed(self, hidden: Float[Array, "b k d"]) -> Float[Array, "b k v"]:
        """The untied output head."""
        weight = self.lm_head.weight.astype(hidden.dtype)
        return jnp.einsum("btd,dv->btv", hidden, weight, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: Int[Array, "b t"],
        *,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput:
        """Logits (float32) for a chunk of tokens that continues each row's cache.

        cache=None: a full causal forward (naive MLA). With a cache, the chunk starts at cache["pos"]
          per row and attends through the latent cache (absorbed MLA; naive for a long first chunk).
        lengths: how many of the chunk's tokens belong to each row (the rest is right padding and is
          neither attended to nor cached); defaults to all of them.
        logit_positions: chunk indices at which to compute logits (default: every position).
        Also hidden (the final normed hidden state [b, t, d], the MTP input) and expert_counts
        (tokens routed to each expert [num_moe_layers, E] int32, padding included: it occupies
        experts too).
        """
        batch, t = tokens.shape
        lengths = chunk_lengths(lengths, batch, t)
        positions = chunk_positions(cache, batch, t)
        x = self.embed(tokens)
        new_cache: Cache = {}
        counts = jnp.zeros((0, self.config.num_experts), jnp.int32)
        if self.dense_layers is not None:
            x, new_cache["dense_layers"], _ = self._run_stack(
                self.dense_layers, "dense_layers", x, positions, lengths, cache
            )
        if self.moe_layers is not None:
            x, new_cache["moe_layers"], counts = self._run_stack(
                self.moe_layers, "moe_layers", x, positions, lengths, cache
            )
        h = self.final_norm(x)
        logits = self._logits(h, logit_positions)
        if cache is None:
            return ForwardOutput(logits=logits, hidden=h, expert_counts=counts)
        new_cache["pos"] = cache["pos"] + lengths
        if "block_table" in cache:
            new_cache["block_table"] = cache["block_table"]
        return ForwardOutput(logits=logits, cache=new_cache, hidden=h, expert_counts=counts)

    # -- multi-token prediction --------------------------------------------------------------------
    def mtp(
        self,
        hidden: Float[Array, "b t d"],
        next_tokens: Int[Array, "b t"],
        *,
        depth: int = 0,
        cache: Cache | None = None,
        lengths: Int[Array, " b"] | None = None,
        logit_positions: Int[Array, "b k"] | None = None,
    ) -> ForwardOutput:
        """MTP module `depth` (0-based) over entries i: hidden[i] = h^{depth}_i and next_tokens[i] =
        t_{i+depth+1}; logits predict t_{i+depth+2}. `hidden` of the output is h^{depth+1} (the next
        depth's input); expert_counts [1, E].

        Entry i runs at rope position i (the cache's slot i). transformers places it at i + 1, the
        position of its token; rope scores depend only on position differences, so both agree.
        """
        if self.mtp_layers is None:
            raise ValueError(f"{self.config.get('name') or 'this model'} has no MTP module (num_mtp_layers = 0)")
        m: MTP = stack.layer(self.mtp_layers, depth)
        batch, t = next_tokens.shape
        lengths = chunk_lengths(lengths, batch, t)
        positions = chunk_positions(cache, batch, t)
        e = self.embed(next_tokens).astype(hidden.dtype)
        x = m.eh_proj(jnp.concatenate([m.enorm(e), m.hnorm(hidden)], axis=-1))

        def body(block: DecoderLayer, x, block_cache):
            return block(x, positions, lengths, block_cache)

        x, block_cache, counts = stack.run(
            m.block, x, None if cache is None else cache["block"], body, remat_policy=policy_of(self.config)
        )
        h = m.norm(x)
        logits = self._logits(h, logit_positions)
        new_cache = None if cache is None else {"pos": cache["pos"] + lengths, "block": block_cache}
        return ForwardOutput(logits=logits, cache=new_cache, hidden=h, expert_counts=counts[None])

    def mtp_loss(
        self,
        tokens: Int[Array, "b t"],
        *,
        hidden: Float[Array, "b t d"] | None = None,
        loss_mask: Float[Array, "b t"] | None = None,
    ) -> Float[Array, ""]:
        """(1/D) sum_k L_MTP^k (§2.2): the mean cross-entropy of each depth k predicting t_{i+k+1};
        the caller weights it by λ. hidden: the main model's output hidden on `tokens` (recomputed
        when omitted). loss_mask [b, t]: weight of each *target* position (e.g. 0 on padding)."""
        depths = self.config.num_mtp_layers
        t = tokens.shape[1]
        if t < depths + 2:
            raise ValueError(f"MTP depth {depths} needs sequences of at least {depths + 2} tokens, got {t}")
        if hidden is None:
            hidden = self(tokens).hidden
        mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
        losses = []
        for k in range(1, depths + 1):
            n = t - k  # entries i = 0 .. t-k-1 (the last has no target and only feeds deeper depths)
            out = self.mtp(hidden[:, :n], tokens[:, k:], depth=k - 1)
            ce = optax.softmax_cross_entropy_with_integer_labels(
                out.logits[:, :-1].astype(jnp.float32), tokens[:, k + 1 :]
            )
            w = mask[:, k + 1 :]
            losses.append(jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0))
            hidden = out.hidden[:, : n - 1]
        return jnp.mean(jnp.stack(losses))


# -- auxiliary-loss-free load balancing ------------------------------------------------------------
def update_router_bias(bias: Float[Array, "... e"], counts: Int[Array, "... e"], gamma: float) -> Float[Array, "... e"]:
    """§2.1.2: raise the bias of under-loaded experts and lower it for over-loaded ones by the
    bias update speed γ: b_e += γ · sign(mean_load − load_e) (per layer, over the last axis)."""
    load = counts.astype(jnp.float32)
    step = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return (bias.astype(jnp.float32) + step).astype(bias.dtype)


_MOE_BIAS = ("moe_layers", "router", "bias")
_MTP_BIAS = ("mtp_layers", "block", "router", "bias")


def update_router_biases(
    params: nnx.State,
    expert_counts: Int[Array, "l e"],
    gamma: float,
    mtp_expert_counts: Int[Array, "k e"] | None = None,
) -> nnx.State:
    """`update_router_bias` for the stacked MoE layers of the main model (moe_layers.router.bias
    [L, E], or its per-layer buffers), from a forward's expert_counts (summed over the batches of a
    step), and, given mtp_expert_counts, for each MTP depth's block (mtp_layers.block.router.bias
    [depths, E]); returns the parameters (an nnx.State, or its pure dict) with only those biases changed."""

    def names(path) -> tuple:
        return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)[: len(_MOE_BIAS)]

    is_layers = lambda x: isinstance(x, stack.Layers)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_layers)
    layers = sum(leaf.shape[0] for path, leaf in flat if names(path) == _MOE_BIAS)
    if layers != expert_counts.shape[0]:
        raise ValueError(f"{expert_counts.shape[0]} rows of expert counts for {layers} MoE layers")

    def update(path, leaf):
        key = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)[: len(_MTP_BIAS)]
        if names(path) == _MOE_BIAS:
            counts = expert_counts
        elif key == _MTP_BIAS and mtp_expert_counts is not None:
            counts = mtp_expert_counts
        else:
            return leaf
        if is_layers(leaf):
            return stack.Layers(update_router_bias(b, counts[i], gamma) for i, b in enumerate(leaf.arrays))
        return update_router_bias(leaf, counts, gamma)

    return jax.tree_util.tree_map_with_path(update, params, is_leaf=is_layers)
