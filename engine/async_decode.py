"""Asynchronous decode: decode step N+1 queued on the device before step N's tokens are read.

With CUDA graphs a decode step's GPU time is a few milliseconds, and the host's per-token work
(detokenizing, stop matching, publishing) would otherwise sit between two steps. Here the
engine queues the next step with the sampled ids still on the device (`ModelRunner
.launch_decode(prev=...)`), then reads the previous step back: the host's work overlaps the
GPU's next forward. A queued step's sequences carry a PENDING_TOKEN placeholder for the token
still on the device; `Postprocessor.resolve` replaces it.

A step is only queued ahead when nothing else wants it: no request waiting for a free slot,
every running sequence in the previous step, a KV slot free for each, and no row that needs
its last token on the host (a penalty, a grammar); the engine does not use it at all while it
speculates (drafts follow the last token).
"""

from __future__ import annotations

from tokenfleet.engine.model_runner import LaunchedDecode, ModelRunner
from tokenfleet.engine.outputs import StepOutput
from tokenfleet.engine.postprocessor import Postprocessor
from tokenfleet.engine.sampling_batch import reads_tokens_on_host
from tokenfleet.engine.scheduler import Scheduler
from tokenfleet.engine.sequence import PENDING_TOKEN, Sequence

__all__ = ["AsyncDecode"]


class AsyncDecode:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, postprocessor: Postprocessor,
                 max_model_len: int):
        self.runner = runner
        self.scheduler = scheduler
        self.postprocessor = postprocessor
        self.max_model_len = max_model_len
        self.in_flight: LaunchedDecode | None = None  # queued, its tokens not read back yet

    def start(self, seqs: list[Sequence]) -> None:
        """Queue a decode step of `seqs` (a replayable, decode-only batch)."""
        assert self.in_flight is None
        self.in_flight = self._launch(seqs, None)

    def advance(self, outputs: list[StepOutput]) -> bool:
        """Queue the step after the one in flight (when nothing else wants the step), then read
        the one in flight and append its outputs. True when a step is in flight again."""
        launched, self.in_flight = self.in_flight, None
        assert launched is not None
        try:
            self.in_flight = self._queue_next(launched)
        except BaseException:
            self._roll_back(launched)
            raise
        outputs += self.postprocessor.resolve(launched.seqs, launched.wait())
        return self.in_flight is not None

    def wait(self) -> None:
        """Wait for the step in flight, if any, to finish on the device."""
        if self.in_flight is not None:
            self.in_flight.wait()

    def _launch(self, seqs: list[Sequence], prev: LaunchedDecode | None) -> LaunchedDecode:
        launched = self.runner.launch_decode(seqs, prev)
        for seq in seqs:
            seq.num_computed_tokens += 1
            seq.output_token_ids.append(PENDING_TOKEN)
            seq.num_pending_tokens += 1
        return launched

    def _roll_back(self, launched: LaunchedDecode) -> None:
        """Undo a step whose tokens will never be read (queuing the next one failed): its
        sequences are left as if it had not run, and recompute that position next time."""
        for seq in launched.seqs:
            if not seq.is_finished and seq.num_pending_tokens:
                seq.num_computed_tokens -= seq.num_pending_tokens
                seq.drop_pending()

    def _queue_next(self, prev: LaunchedDecode) -> LaunchedDecode | None:
        """Queue the decode step after `prev` for the same sequences, before prev's tokens are
        known, when nothing else wants the step: no request waiting for a free slot, every
        running sequence was in prev, and a KV slot is free for each. Sequences that end at
        prev by length are left out; those that end by EOS or a stop are found out when prev
        is resolved, and their extra token is dropped then."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return None  # admit the waiting requests in a normal step
        in_prev = {id(s) for s in prev.seqs}
        if any(id(s) not in in_prev for s in sched.running):
            return None
        seqs = [s for s in sched.running if s.num_output_tokens < s.params.max_new_tokens
                and s.num_tokens < self.max_model_len]
        if not seqs or not self.runner.can_replay(len(seqs)) or reads_tokens_on_host(seqs):
            return None
        if not all(sched.block_manager.append_slot(s) for s in seqs):
            return None  # out of blocks: the scheduler preempts in a normal step
        return self._launch(seqs, prev)
