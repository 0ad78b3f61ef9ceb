"""A paged latent cache: fixed-size pages (64 tokens, FlashMLA's page) in one pool per layer, a
host-side allocator, and one block table per sequence.

A contiguous cache gives every row of a batch `max_len` slots, so a batch mixing a 50-token and a
30K-token request pays 30K slots for both. Here a sequence owns only the pages its tokens need:

    pool (per layer)   [num_blocks, page, 576]        shared by every sequence
    block table        [batch, max_blocks] int32      row b's token t lives at
                                                      pool[table[b, t // page], t % page]

`BlockAllocator` hands out page ids from a free list (host side: allocation happens between
compiled calls, e.g. reserving prompt + max_new_tokens pages per request before a generate call,
and freeing them when the request ends). `PagedCache` tracks which pages each sequence owns and
builds the block-table array fed to the model; `mla_attention.mla_decode(..., block_table=)` reads
the pool through it, and `write_tokens` (jit-able) scatters new latents into their pages. A family
with a paged cache (`capabilities.paged_cache`) builds its stacked pools in `init_paged_cache`
(DeepSeek-V3: [layers, num_blocks, page, 576] per stack, one block table for every layer).

Unused table entries hold `num_blocks`, an out-of-range id: a write aimed there is dropped by the
scatter (it can never land in another sequence's page) and the attention never reads entries past
a row's length.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

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


def init_pool(num_blocks: int, width: int, dtype=jnp.bfloat16, page: int = PAGE) -> Float[Array, "nb page c"]:
    """One layer's page pool, zero-filled (finite, so any implementation may read unused slots)."""
    return jnp.zeros((num_blocks, page, width), dtype)


def write_tokens(
    pool: Float[Array, "nb page c"],
    block_table: Int[Array, "b mb"],
    values: Float[Array, "b t c"],
    positions: Int[Array, "b t"],
    lengths: Int[Array, " b"],
) -> Float[Array, "nb page c"]:
    """Store row b's first lengths[b] chunk tokens at their positions' pages; padding tokens, and
    positions past the row's table, are dropped."""
    nb, page, _ = pool.shape
    mb = block_table.shape[1]
    live = jnp.arange(values.shape[1])[None, :] < lengths[:, None]
    slot = jnp.clip(positions // page, 0, mb - 1)
    blk = jnp.take_along_axis(block_table, slot, axis=1)
    blk = jnp.where(live & (positions >= 0) & (positions < mb * page), blk, nb)  # nb: out of range -> dropped
    return pool.at[blk, positions % page].set(values.astype(pool.dtype), mode="drop")


def gather_tokens(pool: Float[Array, "nb page c"], block_table: Int[Array, "b mb"]) -> Float[Array, "b L c"]:
    """The contiguous view [b, max_blocks * page, c] of each row's pages (unused entries read page
    num_blocks - 1: garbage that callers mask by length)."""
    nb, page, c = pool.shape
    b, mb = block_table.shape
    return pool[jnp.clip(block_table, 0, nb - 1)].reshape(b, mb * page, c)
