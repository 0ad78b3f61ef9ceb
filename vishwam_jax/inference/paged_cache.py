"""A paged cache: fixed-size pages (64 tokens, FlashMLA's page) in one pool per layer, a host-side
allocator, and one block table per sequence.

A contiguous cache gives every row of a batch `max_len` slots, so a batch mixing a 50-token and a
30K-token request pays 30K slots for both. Here a sequence owns only the pages its tokens need:

    pool (per layer)   [num_blocks, page, ...]        shared by every sequence: MLA's latents
                                                      [.., 576], GQA's keys and values
                                                      [.., kv_heads, head_dim]
    block table        [batch, max_blocks] int32      row b's token t lives at
                                                      pool[table[b, t // page], t % page]

`BlockAllocator` hands out page ids from a free list (host side: allocation happens between
compiled calls, e.g. reserving prompt + max_new_tokens pages per request before a generate call,
and freeing them when the request ends). `PagedCache` tracks which pages each sequence owns and
builds the block-table array fed to the model; `write_tokens` (jit-able) scatters new tokens into
their pages and `gather_tokens` reads a row's pages back as one contiguous view
(`mla_attention.mla_decode(..., block_table=)` reads the latent pool through the table directly).
A family with a paged cache (`capabilities.paged_cache`) builds its stacked pools in
`init_paged_cache`, one block table for every layer (DeepSeek-V3: [layers, num_blocks, page, 576]
per stack; Gemma's global layers and Grok-1: K and V [layers, num_blocks, page, kv_heads, head_dim]);
a scanned stack reads and writes them as one pool of layers x num_blocks pages (`merge_layer_pools`,
`layer_block_table`; models/stack.py `scan_paged`).

Unused table entries hold `num_blocks`, an out-of-range id: a write aimed there is dropped by the
scatter (it can never land in another sequence's page) and the attention never reads entries past
a row's length.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, Shaped

PAGE = 64  # tokens per page: FlashMLA's block size, and a multiple of the Pallas kernels' tiles


class CacheFullError(RuntimeError):
    """The pool has fewer free pages than a request needs."""


class BlockAllocator:
    """A free list of page ids 0 .. num_blocks - 1. Allocation is all-or-nothing."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        # popped from the end: low ids first, which keeps a lightly used pool compact
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._used = np.zeros(self.num_blocks, bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise CacheFullError(f"need {n} free pages, only {len(self._free)} of {self.num_blocks} are free")
        out = [self._free.pop() for _ in range(n)]
        self._used[out] = True
        return out

    def free(self, blocks: Iterable[int]) -> None:
        blocks = [int(b) for b in blocks]
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"page id {b} is outside the pool of {self.num_blocks}")
        if len(set(blocks)) != len(blocks) or not self._used[blocks].all():
            raise ValueError(f"double free: some of pages {sorted(blocks)} are not allocated")
        self._used[blocks] = False
        self._free.extend(reversed(blocks))


def pages_for(num_tokens: int, page: int = PAGE) -> int:
    return -(-int(num_tokens) // page)


class PagedCache:
    """Which pages each sequence owns, over one `BlockAllocator` (one pool id space shared by every
    layer: a sequence's page k is the same id in each layer's pool)."""

    def __init__(self, num_blocks: int, page: int = PAGE):
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        self.page = int(page)
        self.allocator = BlockAllocator(num_blocks)
        self._pages: dict[Hashable, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def pages(self, seq: Hashable) -> list[int]:
        return list(self._pages[seq])

    def capacity(self, seq: Hashable) -> int:
        """Tokens the sequence can hold without another reservation."""
        return len(self._pages.get(seq, ())) * self.page

    def reserve(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Make room for `num_tokens` tokens in total (not additional) for `seq`; returns the pages
        added. Raises CacheFullError, leaving the sequence as it was, if the pool is short."""
        have = self._pages.get(seq, [])
        new = self.allocator.allocate(max(0, pages_for(num_tokens, self.page) - len(have)))
        self._pages[seq] = have + new
        return new

    def __contains__(self, seq: Hashable) -> bool:
        return seq in self._pages

    def release(self, seq: Hashable) -> None:
        """Return every page of `seq` to the pool (its contents become garbage for the next owner)."""
        if seq not in self._pages:
            raise KeyError(f"unknown sequence {seq!r}")
        self.allocator.free(self._pages.pop(seq))

    def block_table(self, seqs: Iterable[Hashable], max_blocks: int | None = None) -> np.ndarray:
        """[len(seqs), max_blocks] int32, one row per sequence in the given order; unused entries
        hold num_blocks (out of range: writes there are dropped)."""
        seqs = list(seqs)
        rows = [self._pages[s] for s in seqs]
        width = max([len(r) for r in rows] + [1]) if max_blocks is None else int(max_blocks)
        if any(len(r) > width for r in rows):
            raise ValueError(f"a sequence owns more than max_blocks={width} pages")
        table = np.full((len(seqs), width), self.num_blocks, np.int32)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table


# A pytree of one layer's pools (MLA: {"kv"}; GQA: {"k", "v", "slot_pos"}), or a list of such dicts
# and None (a Gemma period, whose sliding-window layers keep rings instead).
Pools = Any


def init_pool(
    num_blocks: int, width: int | tuple[int, ...], dtype=jnp.bfloat16, page: int = PAGE, fill: float = 0
) -> Shaped[Array, "nb page *c"]:
    """One layer's page pool [num_blocks, page, *width], filled with `fill` (finite, so any
    implementation may read unused slots)."""
    width = (width,) if isinstance(width, int) else tuple(width)
    return jnp.full((num_blocks, page, *width), fill, dtype)


def write_tokens(
    pool: Shaped[Array, "nb page *c"],
    block_table: Int[Array, "b mb"],
    values: Shaped[Array, "b t *c"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
) -> Shaped[Array, "nb page *c"]:
    """Store row b's first lengths[b] chunk tokens at their positions' pages; padding tokens, and
    positions past the row's table, are dropped."""
    nb, page = pool.shape[:2]
    mb = block_table.shape[1]
    live = jnp.arange(values.shape[1])[None, :] < lengths[:, None]
    slot = jnp.clip(positions // page, 0, mb - 1)
    blk = jnp.take_along_axis(block_table, slot, axis=1)
    blk = jnp.where(live & (positions >= 0) & (positions < mb * page), blk, nb)  # nb: out of range -> dropped
    return pool.at[blk, positions % page].set(values.astype(pool.dtype), mode="drop")


def gather_tokens(pool: Shaped[Array, "nb page *c"], block_table: Int[Array, "b mb"]) -> Shaped[Array, "b L *c"]:
    """The contiguous view [b, max_blocks * page, *c] of each row's pages: slot s holds position s
    (unused entries read page num_blocks - 1: garbage that callers mask by length)."""
    nb, page = pool.shape[:2]
    b, mb = block_table.shape
    return pool[jnp.clip(block_table, 0, nb - 1)].reshape(b, mb * page, *pool.shape[2:])


# -- the pools of a scanned stack ---------------------------------------------------------------------
# A stack keeps one pool per layer, stacked [layers, num_blocks, ...]. Sliced out per layer as scan
# inputs and stacked back as outputs, every layer's whole pool would be copied at every step; merged
# into one pool of layers x num_blocks pages instead, it is carried through the loop and written in
# place, layer i addressing its own pages through the block table offset by i x num_blocks.
def merge_layer_pools(pools: Pools) -> Pools:
    """[layers, num_blocks, page, ...] -> [layers * num_blocks, page, ...], every pool of the tree."""
    return jax.tree_util.tree_map(lambda p: p.reshape((-1, *p.shape[2:])), pools)


def split_layer_pools(pools: Pools, depth: int) -> Pools:
    """The inverse of `merge_layer_pools`."""
    return jax.tree_util.tree_map(lambda p: p.reshape((depth, -1, *p.shape[1:])), pools)


def layer_block_table(
    block_table: Int[Array, "b mb"], layer: Int[Array, ""], num_blocks: int, depth: int
) -> Int[Array, "b mb"]:
    """Layer `layer`'s view of the block table into the merged pool; unused entries (ids >=
    num_blocks) go to depth * num_blocks, still out of range, so their writes are still dropped."""
    return jnp.where(block_table < num_blocks, block_table + layer * num_blocks, depth * num_blocks)


def _is_layer_pools(x) -> bool:
    return isinstance(x, dict)


def with_block_table(pools: Pools, block_table: Int[Array, "b mb"]) -> Pools:
    """Each layer's pools with the block table beside them: the layer cache the attention reads."""
    return jax.tree_util.tree_map(lambda p: {**p, "block_table": block_table}, pools, is_leaf=_is_layer_pools)


def without_block_table(layer_caches: Pools) -> Pools:
    """The pools alone again (the inverse of `with_block_table`)."""
    strip = lambda c: {k: v for k, v in c.items() if k != "block_table"}  # noqa: E731
    return jax.tree_util.tree_map(strip, layer_caches, is_leaf=_is_layer_pools)
