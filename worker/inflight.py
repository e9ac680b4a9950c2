"""What a worker remembers about each request it is running, and how it turns engine outputs
into wire events for it (token events, then TGI's last StreamResponse as `final`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfleet.engine.outputs import StepOutput, TokenOutput, TopToken
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.producer.protocol import (
    ErrorEvent,
    FinalDetails,
    FinalEvent,
    InputToken,
    Job,
    Token,
    TokenEvent,
    Usage,
)

__all__ = ["InFlightRequest"]


@dataclass(slots=True)
class InFlightRequest:
    """One job between intake and its final event. Times are Unix epoch milliseconds."""

    request_id: str
    entry_id: bytes  # the job's entry in its lane of the queue stream: XACK/XDEL it at the end
    job: Job
    params: SamplingParams
    num_prompt_tokens: int
    intake_ms: float
    prompt_text: str = ""  # kept only for return_full_text
    num_delivered: int = 1  # delivery count of the stream entry
    lane: str = "normal"  # the priority lane (stream) the entry is in
    first_token_ms: float | None = None
    num_tokens: int = 0  # tokens emitted so far = next index
    tokens: list[Token] = field(default_factory=list)  # kept only when details=True
    num_resumed: int = 0  # tokens an earlier run emitted (read back from the replay stream)
    resumed_text: str = ""  # their text
    delivery_reset: bool = False  # progress made here: its delivery count was set back to 1
    aborting: bool = False  # an abort (cancel, deadline, lost lease) was sent to the engine
    expired: bool = False  # aborted at its deadline: finishes with a deadline_exceeded error
    events_ttl_set_ms: float = 0.0  # when the publisher last set its replay stream's TTL

    @property
    def queue_ms(self) -> float:
        return max(0.0, self.intake_ms - self.job.submitted_ms)

    def resume(self, tokens: list[Token], first_token_ms: float | None) -> None:
        """Continue after `tokens` (indices 0..len-1), which an earlier run already emitted."""
        self.num_resumed = self.num_tokens = len(tokens)
        self.resumed_text = "".join(t.text for t in tokens)
        if tokens:
            self.first_token_ms = first_token_ms
        if self.job.parameters.details:
            self.tokens = list(tokens)

    def deadline_error(self) -> ErrorEvent:
        """The error a request stopped at its deadline ends with."""
        return ErrorEvent(id=self.request_id, error_type="deadline_exceeded",
                          error=f"deadline exceeded after {self.num_tokens} generated tokens; "
                                "generation was stopped")

    def generation_error(self, error: str) -> ErrorEvent:
        """The error a request the engine could not go on with ends with."""
        return ErrorEvent(id=self.request_id, error_type="generation",
                          error=f"{error} (after {self.num_tokens} generated tokens)")

    def token_events(self, tokens: list[TokenOutput], now_ms: float) -> list[TokenEvent]:
        """Events for tokens that are not the request's last one."""
        return [self._token_event(t, now_ms) for t in tokens]

    def final_event(self, out: StepOutput, last: TokenOutput | None, now_ms: float) -> FinalEvent:
        """TGI's last StreamResponse: the last token plus generated_text and details."""
        token = None if last is None else self._record(last, now_ms)
        assert out.finish_reason is not None
        text = out.generated_text
        if self.job.parameters.return_full_text:
            text = self.prompt_text + text
        num_generated = out.num_generated_tokens or self.num_tokens
        return FinalEvent(
            id=self.request_id,
            index=None if last is None else last.index,
            token=token,
            top_tokens=[] if last is None else _tops(last.top_tokens),
            generated_text=text,
            details=FinalDetails(
                finish_reason=out.finish_reason.value,
                generated_tokens=num_generated,
                seed=out.seed if out.seed is not None else self.params.seed,
                prefill=[InputToken(id=t.id, text=t.text, logprob=_finite(t.logprob))
                         for t in out.prefill],
                tokens=self.tokens,
            ),
            usage=Usage(
                prompt_tokens=out.num_prompt_tokens or self.num_prompt_tokens,
                completion_tokens=num_generated,
                total_tokens=(out.num_prompt_tokens or self.num_prompt_tokens) + num_generated,
            ),
            queue_ms=round(self.queue_ms, 3),
            ttft_ms=None if self.first_token_ms is None
            else round(max(0.0, self.first_token_ms - self.job.submitted_ms), 3),
            total_ms=round(max(0.0, now_ms - self.job.submitted_ms), 3),
        )

    def _token_event(self, t: TokenOutput, now_ms: float) -> TokenEvent:
        return TokenEvent(id=self.request_id, index=t.index, token=self._record(t, now_ms),
                          top_tokens=_tops(t.top_tokens), published_ms=now_ms)

    def _record(self, t: TokenOutput, now_ms: float) -> Token:
        token = Token(id=t.id, text=t.text, logprob=_finite(t.logprob), special=t.special)
        if self.first_token_ms is None:
            self.first_token_ms = now_ms
        self.num_tokens = t.index + 1
        if self.job.parameters.details:
            self.tokens.append(token)
        return token


def _tops(tops: tuple[TopToken, ...]) -> list[Token]:
    return [Token(id=t.id, text=t.text, logprob=_finite(t.logprob), special=t.special)
            for t in tops]


def _finite(value: float | None) -> float | None:
    # JSON has no NaN/inf (the first prompt token has no logprob): send null instead.
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return value
