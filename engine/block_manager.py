"""KV-cache block accounting: block ids, reference counts and the prefix cache.

It never touches tensors. A block is *full* when it holds `block_size` computed tokens; full
blocks are hashed (chained with the parent block's hash, so equal hashes mean equal prefixes)
and can be shared between sequences. A freed block keeps its hash and content until it is
reused: free blocks are evicted least-recently-freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tokenfleet.engine.sequence import Sequence

__all__ = ["BlockManager"]


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept to verify a hash hit (hash collisions are possible)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Insertion order = eviction order (least recently freed first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.num_prefix_hits = 0  # blocks reused from the cache, since start (for tests/metrics)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    # ---- allocation ----------------------------------------------------------------------
    def allocate(self, seq: Sequence) -> bool:
        """Give `seq` blocks for all its tokens, reusing cached full blocks of its prefix.

        Sets `seq.num_computed_tokens` to the number of tokens whose KV came from the cache.
        Returns False (and changes nothing) when there are not enough free blocks.
        """
        assert not seq.block_table
        tokens = seq.token_ids
        num_needed = seq.num_blocks_needed(self.block_size)
        hits = self._prefix_hits(tokens)
        # A hit on a free block revives it, so it still consumes a free slot.
        num_fresh = num_needed - len(hits) + sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if num_fresh > len(self._free):
            return False
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        self.num_prefix_hits += len(hits)
        for _ in range(num_needed - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        return True

    def append_slot(self, seq: Sequence) -> bool:
        """Make sure `seq` has a block for its newest token; False if none is free."""
        if seq.num_blocks_needed(self.block_size) <= len(seq.block_table):
            return True
        if not self._free:
            return False
        seq.block_table.append(self._take_free_block())
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure `seq` has blocks for its first `num_tokens` tokens (its newest plus draft
        tokens); False, and nothing taken, when not enough are free."""
        num_more = seq.num_blocks_needed(self.block_size, num_tokens) - len(seq.block_table)
        if num_more <= 0:
            return True
        if num_more > len(self._free):
            return False
        for _ in range(num_more):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses go back to the free list (still cached)."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def register_computed(self, seq: Sequence) -> None:
        """Hash the full blocks of `seq` whose KV is now computed, so others can reuse them.

        Incremental: only blocks that filled up since the last call are hashed (a decode step
        fills one block in `block_size` steps), so the per-step cost does not grow with the
        sequence."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        start = seq.num_hashed_blocks
        if num_full <= start:
            return
        tokens = seq.token_ids
        parent = self._blocks[seq.block_table[start - 1]].hash if start else None
        for i in range(start, num_full):
            block = self._blocks[seq.block_table[i]]
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            if block.hash is None:
                block.hash = hash((parent, chunk))
                block.token_ids = chunk
                self._by_hash.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = num_full

    # ---- internals -----------------------------------------------------------------------
    def _prefix_hits(self, tokens: list[int]) -> list[int]:
        """Cached blocks for the longest prefix of full blocks, leaving >= 1 token to compute
        (the last token must go through the model to produce logits)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = hash((parent, chunk))
            block_id = self._by_hash.get(h)
            if block_id is None or self._blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            parent = h
        return hits

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None:  # evict its cache entry: the content is about to change
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id
