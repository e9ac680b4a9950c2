"""Scheduler policy without a model: budgets, chunking, preemption, no starvation."""

from __future__ import annotations

from tokenfleet.engine.block_manager import BlockManager
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.scheduler import ScheduledBatch, Scheduler
from tokenfleet.engine.sequence import Sequence


def _seq(n: int, rid: str) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=list(range(1, n + 1)),
                    params=SamplingParams(), seed=0)


def _finish_step(batch: ScheduledBatch) -> None:
    """Pretend the model ran: advance compute, append a token to completed sequences."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(7)


def test_decodes_first_then_chunked_prefill_under_budget() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short = _seq(3, "short")
    sched.add(short)
    _finish_step(sched.schedule())  # prefill short (3 tokens)
    long = _seq(25, "long")
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch.num_tokens <= 10
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1  # decode goes first
        chunks.append(batch.num_new_tokens[1])
        _finish_step(batch)
    assert chunks == [9, 9, 7, 1]  # chunked prefill, then long decodes too


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(_seq(2, f"s{i}"))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["s0", "s1"]
    assert len(sched.waiting) == 1


def test_preemption_frees_newest_and_requeues_it_first() -> None:
    bm = BlockManager(4, 2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = _seq(4, "a"), _seq(3, "b")  # a: 2 blocks, b: 2 blocks -> cache full
    sched.add(a)
    sched.add(b)
    _finish_step(sched.schedule())
    assert bm.num_free_blocks == 0
    batch = sched.schedule()  # a needs a 3rd block for its 5th token: b is preempted
    assert batch.num_preempted == 1
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert sched.waiting[0] is b and b.block_table == [] and b.output_token_ids == [7]
    sched.remove(a)
    batch = sched.schedule()  # b comes back and recomputes prompt + its generated token
    assert batch.seqs == [b] and batch.num_new_tokens == [4]


def test_waiting_head_is_never_skipped() -> None:
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(_seq(10, "running"))
    _finish_step(sched.schedule())  # takes 3 of 4 blocks
    big, small = _seq(8, "big"), _seq(2, "small")
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    # small would fit, but big is first in line: FIFO keeps big from starving.
    assert [s.request_id for s in batch.seqs] == ["running"]


def test_drafts_take_only_the_budget_and_blocks_plain_work_left() -> None:
    """A decode with draft tokens runs 1 + drafts tokens. Drafts come after every decode,
    prefill and admission: the budget and the free blocks left cut them, and they never
    take a block a later decode needs (which would preempt it)."""
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    seq = _seq(3, "a")
    sched.add(seq)
    _finish_step(sched.schedule())  # 3-token prefill + a first token: 4 tokens, one block
    seq.draft_token_ids = [9] * 7
    waiting = _seq(2, "w")
    sched.add(waiting)
    batch = sched.schedule()
    # budget 6: a's decode 1, w's prefill 2, then 3 drafts
    assert batch.num_new_tokens == [4, 2] and seq.draft_token_ids == [9] * 3
    assert len(seq.block_table) == 2  # positions 3..6 -> blocks 0, 1

    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    first, second = _seq(3, "a"), _seq(4, "b")
    sched.add(first)
    sched.add(second)
    _finish_step(sched.schedule())  # a: 4 tokens in one block; b: 5 tokens, one block so far
    first.draft_token_ids = [9] * 20
    batch = sched.schedule()  # b's decode takes the last free block; a's drafts get none
    assert batch.num_new_tokens == [1, 1] and first.draft_token_ids == []
    assert batch.num_preempted == 0 and bm.num_free_blocks == 0
