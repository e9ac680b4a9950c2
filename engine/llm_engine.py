"""The engine: requests in, one step at a time, token outputs out.

`step()` reads as schedule -> run -> postprocess. Not thread-safe: one thread owns it (the
worker runs it in a dedicated thread and talks to it through a queue).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from tokenfleet.engine.async_decode import AsyncDecode
from tokenfleet.engine.block_manager import BlockManager
from tokenfleet.engine.config import EngineConfig, ModelConfig
from tokenfleet.engine.detokenizer import IncrementalDetokenizer
from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.grammar_compiler import GrammarCompiler
from tokenfleet.engine.hub import resolve_model
from tokenfleet.engine.loader import load_engine_model, load_model_config
from tokenfleet.engine.model_runner import ModelRunner
from tokenfleet.engine.outputs import Capacity, FinishReason, StepOutput
from tokenfleet.engine.postprocessor import Postprocessor
from tokenfleet.engine.sampling_batch import reads_tokens_on_host
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.scheduler import ScheduledBatch, Scheduler
from tokenfleet.engine.sequence import Sequence
from tokenfleet.engine.speculator import Speculator
from tokenfleet.engine.stop_matcher import StopMatcher
from tokenfleet.engine.tensor_parallel import shard_model_config
from tokenfleet.engine.tensor_parallel_rank import rank_threads
from tokenfleet.engine.tensor_parallel_workers import TensorParallelWorkers
from tokenfleet.engine.tokenizer import Tokenizer

__all__ = ["LLMEngine"]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        threads = rank_threads(config)
        if threads:
            torch.set_num_threads(threads)
        model_dir = config.model_dir or resolve_model(config.model, config.cache_dir)
        config.model_dir = Path(model_dir)
        self.config = config
        self.model_config = load_model_config(config.model_dir)
        mc = self.model_config
        config.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                   mc.max_position_embeddings)
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.eos_token_ids = frozenset(mc.eos_token_ids) | self.tokenizer.eos_token_ids
        self.grammars = GrammarCompiler(self.tokenizer.to_json, mc.vocab_size, self.eos_token_ids)
        self.runner = self._start_runner(config, mc)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.postprocessor = Postprocessor(self.tokenizer, self.scheduler, config.max_model_len)
        self.speculator = (Speculator(config.speculate, config.max_model_len)
                           if config.speculate else None)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []  # finished outside a step (aborts)
        self.async_decode = AsyncDecode(self.runner, self.scheduler, self.postprocessor,
                                        config.max_model_len)
        self.num_prefilled_tokens = 0  # tokens run through the model as prefill, since start

    def _start_runner(self, config: EngineConfig, mc: ModelConfig) -> ModelRunner:
        """The model runner of rank 0; with tensor parallelism, after starting ranks 1.. in
        their own processes (they load their slices at the same time)."""
        size = config.tensor_parallel_size
        local = shard_model_config(mc, size)  # raises before any process starts
        device = torch.device(config.device)
        if size == 1:
            return ModelRunner(config, mc, load_engine_model(config, mc, device))
        workers = TensorParallelWorkers(config)
        try:
            model = load_engine_model(config, local, device, 0, size)
            workers.wait_for("loaded")  # a rank that failed to load fails the engine now
            runner = ModelRunner(config, local, model, workers)
            workers.wait_for("ready")
        except BaseException:
            workers.close()
            raise
        return runner

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do without tensor parallelism), after
        the decode step still queued on the device, if any."""
        if self.runner.tp is not None:
            self.async_decode.wait()
            self.runner.tp.close()

    @classmethod
    def from_model(cls, model: str, **engine_args: Any) -> LLMEngine:
        """`LLMEngine.from_model("smollm2", dtype="float32", max_num_seqs=8)`."""
        return cls(EngineConfig(model=str(model), **engine_args))

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    *, resume_token_ids: Seq[int] = ()) -> None:
        """Queue a request. Raises ValidationError for bad input; nothing is changed then."""
        if request_id in self._seqs:
            raise ValidationError(f"duplicate request id {request_id!r}")
        params.validate()
        prompt = self._checked_prompt(list(prompt_token_ids), params)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValidationError(f"Input validation error: `logit_bias` keys must be token "
                                  f"ids below {vocab}")
        resumed = list(resume_token_ids)
        if len(resumed) >= params.max_new_tokens:
            raise ValidationError("resume_token_ids already reach max_new_tokens")
        matcher = (self.grammars.matcher(params.grammar, resumed)
                   if params.grammar is not None else None)
        seq = Sequence(
            request_id=request_id, prompt_token_ids=prompt, params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            eos_token_ids=frozenset(()) if params.ignore_eos else self.eos_token_ids,
            want_prompt_logprobs=params.decoder_input_details, grammar_matcher=matcher,
        )
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt)
        seq.stop_matcher = StopMatcher(params.stop)
        for token_id in resumed:  # rebuild text state; these tokens are not emitted again
            seq.output_token_ids.append(token_id)
            released, _ = seq.stop_matcher.push(seq.detokenizer.add(token_id))
            seq.output_text += released
        self._seqs[request_id] = seq
        if matcher is not None and matcher.is_stopped():
            # Resumed after the token that completed its grammar: nothing left to generate.
            seq.output_text += seq.stop_matcher.flush()
            self._pending.append(self.postprocessor.finish(seq, FinishReason.EOS_TOKEN, []))
            return
        self.scheduler.add(seq)

    def _checked_prompt(self, prompt: list[int], params: SamplingParams) -> list[int]:
        if not prompt:
            raise ValidationError("Input validation error: `inputs` cannot be empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise ValidationError(f"Input validation error: token ids must be in [0, {vocab})")
        if params.truncate is not None and len(prompt) > params.truncate:
            prompt = prompt[-params.truncate:]
        max_len = self.config.max_model_len
        assert max_len is not None
        if len(prompt) + params.max_new_tokens > max_len:
            raise ValidationError(
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                f"{max_len}. Given: {len(prompt)} `inputs` tokens and {params.max_new_tokens} "
                f"`max_new_tokens`")
        need = -(-(len(prompt) + params.max_new_tokens) // self.config.block_size)
        if need > self.block_manager.num_blocks:
            raise ValidationError(
                f"request needs {need} KV blocks but the cache has only "
                f"{self.block_manager.num_blocks}; lower max_new_tokens or grow the KV cache")
        return prompt

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its `cancelled` output comes out of the next `step()`."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            if seq is not None:  # finished, its output not collected (a step failed after)
                del self._seqs[request_id]
            return False
        self.scheduler.remove(seq)
        seq.drop_pending()  # a step in flight may still compute its next token: ignored
        self._pending.append(self.postprocessor.finish(seq, FinishReason.CANCELLED, []))
        del self._seqs[request_id]
        return True

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """schedule -> run -> postprocess. With asynchronous decode (CUDA graphs) a decode step
        is queued and its outputs are returned by the next call, which first queues the step
        after it: the host's postprocessing then overlaps the device's next forward.

        If it raises, the engine stays usable: outputs already produced come with the next
        call, and a step whose tokens were never read is undone."""
        with self._on_device():  # the calling thread's current CUDA device may be another
            return self._step()

    def _on_device(self) -> AbstractContextManager[Any]:
        device = self.runner.device
        return torch.cuda.device(device) if device.type == "cuda" else nullcontext()

    def _step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        try:
            if self.async_decode.in_flight is not None and self.async_decode.advance(outputs):
                return self._forget_finished(outputs)
            if self.speculator is not None:
                self.speculator.propose(self.scheduler.running)
            batch = self.scheduler.schedule()
            if batch:
                self._run(batch, outputs)
        except BaseException:
            self._pending = outputs + self._pending  # what finished is still reported, later
            raise
        return self._forget_finished(outputs)

    def _run(self, batch: ScheduledBatch, outputs: list[StepOutput]) -> None:
        """Run `batch`: queued without waiting when it may be (its outputs come with the next
        step), else run and postprocessed now, appending to `outputs`."""
        self.num_prefilled_tokens += sum(  # everything but the decodes (drafts never count)
            n - len(s.draft_token_ids) for s, n in zip(batch.seqs, batch.num_new_tokens,
                                                       strict=True)
            if not (n == 1 + len(s.draft_token_ids)
                    and s.num_computed_tokens >= s.num_prompt_tokens))
        if self._async_decode_ok(batch):
            self.async_decode.start(batch.seqs)
            return
        run = self.runner.run(batch)
        outputs += self.postprocessor.process(batch, run)

    def _forget_finished(self, outputs: list[StepOutput]) -> list[StepOutput]:
        for out in outputs:
            if out.finished:
                self._seqs.pop(out.request_id, None)
        return outputs

    def _async_decode_ok(self, batch: ScheduledBatch) -> bool:
        """Decode-only, replayable, and no row needs the previous token on the host (a
        penalty reads the history; a grammar's mask follows each token; speculation's drafts
        follow it too)."""
        return (self.config.async_decode and self.speculator is None
                and self.runner.replayable(batch)
                and not reads_tokens_on_host(batch.seqs))

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._pending)
                or self.async_decode.in_flight is not None)

    def score(self, prompt_token_ids: Seq[int]) -> torch.Tensor:
        """Next-token logits [vocab] (float32) after `prompt_token_ids`; for verification."""
        seq = Sequence(request_id="<score>", prompt_token_ids=list(prompt_token_ids),
                       params=SamplingParams(), seed=0)
        if not self.block_manager.allocate(seq):
            raise ValidationError("not enough free KV blocks to score this prompt now")
        try:
            with self._on_device():
                return self.runner.last_logits(seq)
        finally:
            self.block_manager.free(seq)

    # ---- introspection -------------------------------------------------------------------
    def capacity(self) -> Capacity:
        sched = self.scheduler
        bm = self.block_manager
        waiting_blocks = sum(s.num_blocks_needed(bm.block_size) for s in sched.waiting)
        free_blocks = max(0, bm.num_free_blocks - waiting_blocks)
        num_seqs = len(sched.running) + len(sched.waiting)
        return Capacity(
            num_free_seqs=max(0, sched.max_num_seqs - num_seqs),
            num_free_blocks=free_blocks,
            num_admissible_tokens=free_blocks * bm.block_size,
            num_waiting=len(sched.waiting),
            num_running=len(sched.running),
        )

    @property
    def attention_path(self) -> str:
        """The attention backend, and whether CPU decode runs in the C kernel: `torch+c_decode`
        when it was built, plain `torch` when it could not be (no C compiler) or is off."""
        backend = self.runner.backend
        kernel = getattr(backend, "decode_kernel", None)
        return backend.name + ("+c_decode" if kernel is not None else "")

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "kv_usage": bm.usage(),
            "num_prefix_hit_blocks": bm.num_prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prefilled_tokens": self.num_prefilled_tokens,
            "num_draft_tokens": self.postprocessor.num_verified_drafts,
            "num_accepted_draft_tokens": self.postprocessor.num_accepted_drafts,
        }
