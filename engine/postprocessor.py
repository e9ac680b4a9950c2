"""After the model ran: append sampled tokens, detokenize, match stops, decide who finished."""

from __future__ import annotations

from tokenfleet.engine.grammar_compiler import first_error_line
from tokenfleet.engine.model_runner import RunOutput
from tokenfleet.engine.outputs import FinishReason, StepOutput, TokenOutput, TopToken
from tokenfleet.engine.sampler import SamplerOutput
from tokenfleet.engine.scheduler import ScheduledBatch, Scheduler
from tokenfleet.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from tokenfleet.engine.tokenizer import Tokenizer

__all__ = ["Postprocessor"]

_NEG_INF = float("-inf")


class Postprocessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.num_verified_drafts = 0  # speculative decoding, since start: drafts run
        self.num_accepted_drafts = 0  # ... and those that matched the sampled token

    def process(self, batch: ScheduledBatch, run: RunOutput) -> list[StepOutput]:
        bm = self.scheduler.block_manager
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            # A draft's KV counts once the draft is accepted (`_emit_verified`).
            seq.num_computed_tokens += n - len(seq.draft_token_ids)
            bm.register_computed(seq)
            for pos, logprob in run.prompt_logprobs.get(id(seq), []):
                seq.prompt_logprob_by_pos[pos] = logprob
        out = run.sampler_output
        if out is None:
            return []
        return self._emit_all(run.sampled_seqs, out, resolve=False)

    def resolve(self, seqs: list[Sequence], out: SamplerOutput) -> list[StepOutput]:
        """Outputs of an asynchronous decode step: each sequence's oldest PENDING_TOKEN becomes
        its sampled token (sequences finished or cancelled meanwhile are skipped)."""
        return self._emit_all(seqs, out, resolve=True)

    def _emit_all(self, seqs: list[Sequence], out: SamplerOutput, resolve: bool
                  ) -> list[StepOutput]:
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        outputs = []
        end = 0
        while end < len(seqs):
            seq, i = seqs[end], end
            end += 1 + (0 if resolve else len(seq.draft_token_ids))  # its rows: i .. end - 1
            if seq.is_finished:
                continue
            if end - i > 1:
                outputs.append(self._emit_verified(
                    seq, token_ids[i:end], logprobs[i:end],
                    top_ids[i:end] if top_ids else None, top_lps[i:end] if top_lps else None))
                continue
            if resolve:
                index = seq.num_output_tokens - seq.num_pending_tokens
                assert seq.output_token_ids[index] == PENDING_TOKEN
                seq.output_token_ids[index] = token_ids[i]
                seq.num_pending_tokens -= 1
                self.scheduler.block_manager.register_computed(seq)
            else:
                seq.output_token_ids.append(token_ids[i])
                index = seq.num_output_tokens - 1
            tops = (self._top_tokens(seq, top_ids[i], top_lps[i]) if top_ids and top_lps
                    else ())
            outputs.append(self._emit(seq, index, token_ids[i], logprobs[i], tops))
        return outputs

    def _emit_verified(self, seq: Sequence, token_ids: list[int], logprobs: list[float],
                       top_ids: list[list[int]] | None, top_lps: list[list[float]] | None
                       ) -> StepOutput:
        """A step that ran `seq`'s last token and its drafts d1..dk: row j's token t_j is what
        a plain decode samples after the drafts before it, so t_0 is emitted, and each d_j
        that equals t_(j-1) is accepted (its KV is valid) and t_j emitted after it, until a
        draft differs or the request finishes. One output with every emitted token."""
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        self.num_verified_drafts += len(drafts)
        tokens: list[TokenOutput] = []
        for j, token_id in enumerate(token_ids):
            if j:
                if drafts[j - 1] != token_ids[j - 1]:
                    break
                seq.num_computed_tokens += 1  # draft j - 1's position: computed from a match
                self.num_accepted_drafts += 1
            seq.output_token_ids.append(token_id)
            tops = (self._top_tokens(seq, top_ids[j], top_lps[j]) if top_ids and top_lps
                    else ())
            out = self._emit(seq, seq.num_output_tokens - 1, token_id, logprobs[j], tops)
            tokens += out.tokens
            if out.finished:
                out.tokens = tokens
                return out
        self.scheduler.block_manager.register_computed(seq)
        return StepOutput(request_id=seq.request_id, tokens=tokens)

    def _emit(self, seq: Sequence, index: int, token_id: int, logprob: float,
              tops: tuple[TopToken, ...]) -> StepOutput:
        """Text, stop and finish decisions for the token at output `index` (later indices may
        be pending: lengths are counted up to this token)."""
        matcher = seq.grammar_matcher
        if matcher is not None and not matcher.consume_token(token_id):
            # the mask admitted the token: only a parser limit (e.g. lexer fuel) rejects it
            error = first_error_line(str(matcher.get_error()), "parser error")
            return self._fail(seq, f"the output left its grammar: {error}")
        grammar_done = matcher is not None and matcher.is_stopped()
        text, stopped = seq.stop_matcher.push(seq.detokenizer.add(token_id))
        reason = self._finish_reason(seq, index + 1, token_id, stopped, grammar_done)
        if reason is not None and reason is not FinishReason.STOP_SEQUENCE:
            text += seq.stop_matcher.flush()
            if seq.stop_matcher.stopped:  # the held tail turned out to contain a stop
                reason = FinishReason.STOP_SEQUENCE
        seq.output_text += text
        token = TokenOutput(index=index, id=token_id, text=text, logprob=logprob,
                            special=self.tokenizer.is_special(token_id), top_tokens=tops)
        if reason is None:
            return StepOutput(request_id=seq.request_id, tokens=[token])
        seq.drop_pending()  # tokens queued after this one are not part of the answer
        self.scheduler.remove(seq)
        return self.finish(seq, reason, [token])

    def _fail(self, seq: Sequence, error: str) -> StepOutput:
        """End a request that cannot go on (its token is not reported)."""
        seq.drop_pending()
        self.scheduler.remove(seq)
        out = self.finish(seq, FinishReason.ERROR, [])
        out.error = error
        return out

    def _finish_reason(self, seq: Sequence, num_output: int, token_id: int, stopped: bool,
                       grammar_done: bool) -> FinishReason | None:
        # A complete grammar allows only EOS next: the request ends now, as if EOS had been
        # sampled (TGI's finish reason then, one step sooner).
        if token_id in seq.eos_token_ids or grammar_done:
            return FinishReason.EOS_TOKEN
        if stopped or token_id in seq.params.stop_token_ids:
            return FinishReason.STOP_SEQUENCE
        if num_output >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        if seq.num_prompt_tokens + num_output >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason, tokens: list[TokenOutput]
               ) -> StepOutput:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        prefill: list[TokenOutput] = []
        if seq.want_prompt_logprobs:
            pieces = self.tokenizer.convert_ids_to_tokens(seq.prompt_token_ids)
            prefill = [
                TokenOutput(index=p, id=t, text=pieces[p],
                            logprob=seq.prompt_logprob_by_pos.get(p, float("nan")),
                            special=self.tokenizer.is_special(t))
                for p, t in enumerate(seq.prompt_token_ids)
            ]
        return StepOutput(
            request_id=seq.request_id, tokens=tokens, finished=True, finish_reason=reason,
            generated_text=seq.output_text, num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_output_tokens, seed=seq.seed, prefill=prefill,
        )

    def _top_tokens(self, seq: Sequence, ids: list[int], logprobs: list[float]
                    ) -> tuple[TopToken, ...]:
        """The row's best `top_n_tokens`, leaving out tokens it could not take (logprob -inf:
        cut by top_k / top_p, or outside its grammar): they are no alternatives."""
        n = seq.params.top_n_tokens or 0
        return tuple(
            TopToken(id=t, text=self.tokenizer.decode([t], skip_special_tokens=False),
                     logprob=lp, special=self.tokenizer.is_special(t))
            for t, lp in zip(ids[:n], logprobs[:n], strict=True) if lp != _NEG_INF
        )

