"""What runs in the next step: decodes first, then chunked prefills, under a token budget.

Policy (like vLLM's v1 scheduler):
- Running sequences go first, in admission order; a decode needs 1 token, an unfinished
  prefill gets the next chunk of its prompt. If a decode needs a new KV block and none is free,
  the newest running sequence is preempted (its blocks freed; it goes back to the front of the
  queue and is recomputed later, keeping every token it generated).
- Then waiting sequences are admitted in arrival order while sequence slots, blocks for their
  whole context and token budget remain. The head of the queue is never skipped (no starvation).
- Last, speculative decoding's draft tokens ride on the scheduled decodes, from whatever budget
  and free blocks are left (they never delay, preempt or block plain work).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenfleet.engine.block_manager import BlockManager
from tokenfleet.engine.sequence import Sequence, SequenceStatus

__all__ = ["ScheduledBatch", "Scheduler"]


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of each sequence to run this step
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for tests and metrics

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        budget = self._schedule_waiting(batch, budget)
        self._schedule_drafts(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while not self.block_manager.append_slot(seq):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    return budget
            num_new = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return budget

    def _schedule_drafts(self, batch: ScheduledBatch, budget: int) -> None:
        """Speculative decoding: the scheduled decodes' draft tokens, from what every decode,
        prefill and admission left of the budget and the free blocks (drafts never take a
        slot, a token or a block that plain work would use). Drafts that do not fit are cut.
        (A running sequence left out of the step keeps its drafts unread: nothing reads the
        drafts of a sequence outside the batch, and the next proposal replaces them.)"""
        bm = self.block_manager
        for i, seq in enumerate(batch.seqs):
            if not seq.draft_token_ids:
                continue
            if batch.num_new_tokens[i] != 1 or seq.num_uncomputed_tokens != 1:
                seq.draft_token_ids = []
                continue
            room = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_tokens
            drafts = seq.draft_token_ids[:max(0, min(budget, room))]
            if drafts:
                reserved = bm.reserve(seq, seq.num_tokens + len(drafts))
                assert reserved, "room was counted from the free blocks"
            seq.draft_token_ids = drafts
            batch.num_new_tokens[i] += len(drafts)
            budget -= len(drafts)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, requeue at the front."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
