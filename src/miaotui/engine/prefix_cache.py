"""Prefix caching: reuse full KV blocks that an earlier request already computed for the same prefix.

A full block's hash chains its parent block's hash with its own token ids, so two equal hashes mean
two equal *whole prefixes* (ending at the same position), and the longest reusable prefix of a prompt
is found with one dict lookup per block. Only full blocks are cached: they are never written again.

Blocks that nobody references stay cached but are *evictable*, in least-recently-released order; the
block manager evicts them only when its free list runs out.

Example (block_size 2): prompt ``[5, 6, 7, 8, 9]`` has full blocks ``[5, 6]`` and ``[7, 8]`` with hashes
``h0 = H(root, [5, 6])`` and ``h1 = H(h0, [7, 8])``; ``[9]`` is partial and never hashed. A later prompt
``[5, 6, 7, 8, 1]`` computes the same ``h0, h1``, finds both blocks and starts computing at position 4.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes
_ROOT = bytes(16)  # the parent of a sequence's first block


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """128-bit digest of (parent hash, token ids): collisions are negligible, unlike Python's ``hash``."""
    h = hashlib.blake2b(parent if parent is not None else _ROOT, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                        num_blocks: int | None = None) -> None:
    """Append hashes so ``hashes`` covers the first ``num_blocks`` full blocks of ``token_ids`` (all of them
    when None). ``hashes`` must already be the hashes of a prefix of ``token_ids``: only new ones are computed.
    """
    full = len(token_ids) // block_size
    upto = full if num_blocks is None else min(num_blocks, full)
    for i in range(len(hashes), upto):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size]))


class PrefixCache:
    """Maps block hashes to physical block ids; parks unreferenced cached blocks for LRU eviction.

    It does not count references: the block manager tells it when a cached block's last reference goes
    (``park``) or comes back (``unpark``), and asks it for a victim (``evict``) when it has no free block.
    """

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first
        # statistics, in blocks
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    def __len__(self) -> int:
        """Blocks currently cached, referenced or not."""
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest run of cached blocks at the start of ``hashes``."""
        blocks: list[int] = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break  # a hit after a miss is useless: its K/V depends on the missing block
            blocks.append(block)
        self.num_queried_blocks += len(hashes)
        self.num_hit_blocks += len(blocks)
        return blocks

    def insert(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a block whose K/V is now computed. False (and nothing changes) when the block is
        already cached or another block holds the same prefix (two requests computed it in one step)."""
        if block_hash in self._block_of or block_id in self._hash_of:
            return False
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def park(self, block_id: int) -> bool:
        """The block's last reference went: keep it if cached (True), else the caller frees it (False)."""
        if block_id not in self._hash_of:
            return False
        self._evictable[block_id] = None
        return True

    def unpark(self, block_id: int) -> None:
        """A parked block was hit again: it is referenced, so no longer evictable."""
        del self._evictable[block_id]

    def evict(self) -> int:
        """Forget the least recently released block and hand its id back for reuse."""
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block_id)]
        return block_id

    def evictable_blocks(self) -> list[int]:
        return list(self._evictable)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0
