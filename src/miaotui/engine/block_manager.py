"""Paged KV cache bookkeeping: which physical blocks each request's tokens live in. No tensors here.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A request's block table (``req.block_ids``)
grows on demand as its tokens are computed, and every block carries a reference count so requests can share
the full blocks of a common prefix (see ``prefix_cache.py``). A block is, at any time, exactly one of:
free (in the free list), referenced (ref count > 0), or cached-but-unreferenced (evictable).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from miaotui.engine.engine_config import CacheConfig
from miaotui.engine.prefix_cache import PrefixCache, extend_block_hashes
from miaotui.engine.request import Request


class BlockManager:
    def __init__(self, config: CacheConfig):
        self.block_size = config.block_size
        self.num_blocks = config.num_slots // config.block_size  # num_slots raises if num_blocks is unresolved
        self._ref = [0] * config.num_blocks
        self._free: deque[int] = deque(range(config.num_blocks))  # never cached (or evicted) blocks
        self.prefix_cache: PrefixCache | None = PrefixCache() if config.enable_prefix_caching else None

    # ---- accounting
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: free ones plus cached ones nobody references."""
        return len(self._free) + (self.prefix_cache.num_evictable if self.prefix_cache else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation
    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding a prefix of ``req``'s tokens (a lookup only: nothing is taken).

        At least the last token is left out, so the model still runs on it and produces logits.
        """
        if self.prefix_cache is None:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, limit)
        return self.prefix_cache.lookup(req.block_hashes[:limit])

    def _blocks_needed(self, req: Request, num_new_tokens: int, cached_blocks: Sequence[int]) -> int:
        start = req.num_computed_tokens + len(cached_blocks) * self.block_size
        grow = max(0, self.blocks_for(start + num_new_tokens) - len(req.block_ids) - len(cached_blocks))
        # a hit on an unreferenced cached block takes it out of the evictable pool too
        revived = sum(1 for b in cached_blocks if self._ref[b] == 0)
        return grow + revived

    def can_allocate(self, req: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        return self._blocks_needed(req, num_new_tokens, cached_blocks) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; all or nothing.

        ``cached_blocks`` (from ``match_prefix``, only for a request holding no blocks) are shared first
        and ``req.num_computed_tokens`` moves past them. Returns False, changing nothing, when short.
        """
        if cached_blocks and (req.block_ids or req.num_computed_tokens):
            raise ValueError("cached blocks can only start an empty block table")
        if not self.can_allocate(req, num_new_tokens, cached_blocks):
            return False
        for b in cached_blocks:
            if self._ref[b] == 0:
                self.prefix_cache.unpark(b)  # before taking new blocks, so eviction cannot pick it
            self._ref[b] += 1
        req.block_ids.extend(cached_blocks)
        req.num_computed_tokens += len(cached_blocks) * self.block_size
        if cached_blocks:
            req.num_committed_blocks = len(cached_blocks)  # they are in the cache already
        need = self.blocks_for(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        for _ in range(need):
            req.block_ids.append(self._take())
        return True

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block = self.prefix_cache.evict()  # can_allocate guaranteed one is evictable
        assert self._ref[block] == 0, f"block {block} handed out while referenced"
        self._ref[block] = 1
        return block

    def free(self, req: Request) -> None:
        """Drop ``req``'s references. Blocks nobody else holds become free, or evictable when cached.

        Tail blocks go first, so under LRU they are evicted before the prefix they depend on.
        """
        for b in reversed(req.block_ids):
            if self._ref[b] <= 0:
                raise RuntimeError(f"double free of block {b} by request {req.request_id!r}")
            self._ref[b] -= 1
            if self._ref[b] == 0 and not (self.prefix_cache and self.prefix_cache.park(b)):
                self._free.append(b)
        req.block_ids = []
        req.num_committed_blocks = 0

    # ---- prefix cache upkeep
    def cache_computed_blocks(self, req: Request) -> None:
        """Register ``req``'s blocks that became full of computed K/V, so later requests can share them.

        Called after the step ran, never at allocation: a block is shared only once its K/V exists.
        """
        if self.prefix_cache is None:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_committed_blocks:
            return
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, full)
        for i in range(req.num_committed_blocks, full):
            self.prefix_cache.insert(req.block_ids[i], req.block_hashes[i])
        req.num_committed_blocks = full

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block (benchmarks: no warm cache between runs). Returns count."""
        n = 0
        while self.prefix_cache and self.prefix_cache.num_evictable:
            self._free.append(self.prefix_cache.evict())
            n += 1
        return n

    # ---- debugging
    def check(self, tables: Iterable[Sequence[int]]) -> None:
        """Assert exact accounting given every live block table: ref counts equal table occurrences and
        each block is exactly one of free / evictable / referenced. O(num_blocks); tests call it each step."""
        counts = [0] * self.num_blocks
        for table in tables:
            for b in table:
                counts[b] += 1
        assert counts == self._ref, "ref counts disagree with the block tables"
        free = list(self._free)
        evictable = self.prefix_cache.evictable_blocks() if self.prefix_cache else []
        idle = free + evictable
        assert len(set(idle)) == len(idle), "a block is listed twice as free/evictable"
        assert all(self._ref[b] == 0 for b in idle), "a referenced block is free or evictable"
        assert all(self.prefix_cache.is_cached(b) for b in evictable), "an evictable block is not cached"
        referenced = sum(1 for r in self._ref if r > 0)
        assert referenced + len(idle) == self.num_blocks, "a block is lost"
