"""BlockManager: allocation, refcounts, prefix-cache hits with verification, LRU eviction."""

from __future__ import annotations

from tokenfleet.engine.block_manager import BlockManager
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.sequence import Sequence


def _seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=list(tokens), params=SamplingParams(), seed=0)


def _compute_all(bm: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(list(range(10)), "a"), _seq(list(range(100, 105)), "b")
    assert bm.allocate(a) and bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 3
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_allocate_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = _seq(list(range(9)))  # needs 3 blocks
    assert not bm.allocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_skips_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(13)), "first")
    assert bm.allocate(first)
    _compute_all(bm, first)
    second = _seq([*range(12), 99, 98], "second")  # same first 3 full blocks
    assert bm.allocate(second)
    assert second.block_table[:3] == first.block_table[:3]
    assert second.num_computed_tokens == 12
    assert bm.num_prefix_hits == 3
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 16


def test_prefix_hit_leaves_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(8)), "first")
    assert bm.allocate(first)
    _compute_all(bm, first)
    again = _seq(list(range(8)), "again")  # fully cached: still must run >= 1 token
    assert bm.allocate(again)
    assert again.num_computed_tokens == 4


def test_freed_blocks_stay_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first = _seq(list(range(9)), "first")  # 3 blocks, 2 full and hashed
    assert bm.allocate(first)
    _compute_all(bm, first)
    bm.free(first)
    revived = _seq(list(range(9)), "revived")
    assert bm.allocate(revived)
    assert revived.num_computed_tokens == 8  # revived from the free list
    bm.free(revived)
    other = _seq(list(range(50, 66)), "other")  # needs all 4 blocks: evicts the cache
    assert bm.allocate(other)
    bm.free(other)
    late = _seq(list(range(9)), "late")
    assert bm.allocate(late)
    assert late.num_computed_tokens == 0


def test_different_prefix_same_block_content_does_not_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first")
    assert bm.allocate(first)
    _compute_all(bm, first)
    # Second block equals first's second block, but the parent differs: no hit.
    second = _seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "second")
    assert bm.allocate(second)
    assert second.num_computed_tokens == 0


def test_append_slot_grows_by_one_block_at_boundaries() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = _seq([1, 2])
    assert bm.allocate(seq)
    for t in range(3, 7):
        seq.output_token_ids.append(t)
        assert bm.append_slot(seq)
    assert len(seq.block_table) == 3
    seq.output_token_ids.append(7)
    assert not bm.append_slot(seq)  # out of blocks
