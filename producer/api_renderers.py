"""How one request's events become HTTP bodies, per API (TGI, OpenAI chat, OpenAI completions).

The gateway runs every request the same way (enqueue, read events, stream or wait); a
renderer only decides what the bytes look like: the JSON of each server-sent event, the
stream's terminator, the whole-response body, and the error body.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from tokenfleet.producer.errors import GenerationError, TokenfleetError
from tokenfleet.producer.openai_api import (
    completion_logprobs,
    finish_reason,
    logprobs_content,
)
from tokenfleet.producer.protocol import FinalEvent, TokenEvent
from tokenfleet.producer.tgi_api import (
    best_of_index,
    best_of_response,
    generate_response,
    stream_response,
)
from tokenfleet.producer.tool_calls import ToolCallPlan, ToolCallStream

__all__ = ["ChatRenderer", "CompletionRenderer", "Renderer", "TgiRenderer"]


class Renderer:
    """Base: TGI-style error bodies, `data:` events, no terminator."""

    sse_prefix = b"data:"
    stream_done = b""

    def chunks(self, event: TokenEvent | FinalEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def body(self, final: FinalEvent, tokens: list[TokenEvent]) -> Any:
        raise NotImplementedError

    def body_many(self, finals: list[FinalEvent], tokens: list[list[TokenEvent]]) -> Any:
        """The body for several answers to one request (best_of, n)."""
        raise NotImplementedError

    def headline(self, finals: list[FinalEvent], tokens: list[list[TokenEvent]]
                 ) -> FinalEvent:
        """The answer whose numbers go in the response headers (of several)."""
        return finals[0]

    def for_choices(self, num_choices: int) -> list[Renderer]:
        """Renderers of a stream with several answers, one per answer (copy)."""
        if num_choices != 1:
            raise NotImplementedError("this API streams one answer")
        return [self]

    def usage_chunks(self, finals: list[FinalEvent]) -> list[dict[str, Any]]:
        """The chunks after every answer of a stream with several ended."""
        return []

    def error(self, error: TokenfleetError) -> dict[str, Any]:
        return {"error": str(error), "error_type": error.error_type}


@dataclass
class TgiRenderer(Renderer):
    """`/generate`, `/generate_stream` and TGI's `/` (whose plain response is a list)."""

    details: bool = False
    as_list: bool = False

    def chunks(self, event: TokenEvent | FinalEvent) -> list[dict[str, Any]]:
        if isinstance(event, FinalEvent) and event.details.finish_reason == "cancelled":
            return [self.error(_cancelled(event))]
        return [stream_response(event, details=self.details)]

    def body(self, final: FinalEvent, tokens: list[TokenEvent]) -> Any:
        if final.details.finish_reason == "cancelled":
            raise _cancelled(final)
        response = generate_response(final, tokens, details=self.details)
        return [response] if self.as_list else response

    def body_many(self, finals: list[FinalEvent], tokens: list[list[TokenEvent]]) -> Any:
        for final in finals:
            if final.details.finish_reason == "cancelled":
                raise _cancelled(final)
        response = best_of_response(finals, tokens, details=self.details)
        return [response] if self.as_list else response

    def headline(self, finals: list[FinalEvent], tokens: list[list[TokenEvent]]
                 ) -> FinalEvent:
        return finals[best_of_index(finals, tokens)]  # the answer TGI returns


def _cancelled(final: FinalEvent) -> GenerationError:
    # TGI has no "cancelled" finish reason (its clients refuse one): to a TGI client a
    # cancelled request is a generation that did not complete.
    return GenerationError(f"request {final.id} was cancelled after "
                           f"{final.details.generated_tokens} tokens", request_id=final.id)


@dataclass
class _OpenAIRenderer(Renderer):
    model: str
    request_id: str
    include_usage: bool = False
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    choice_index: int = 0  # n > 1: which answer this renderer streams
    own_usage: bool = True  # n > 1: usage comes once, after all answers (`usage_chunks`)

    sse_prefix = b"data: "
    stream_done = b"data: [DONE]\n\n"
    chunk_object = ""  # the streamed chunks' `object`
    body_object = ""  # a whole response's `object`

    def for_choices(self, num_choices: int) -> list[Renderer]:
        if num_choices == 1:
            return [self]
        return [dataclasses.replace(self, choice_index=i, own_usage=False)
                for i in range(num_choices)]

    def usage_chunks(self, finals: list[FinalEvent]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        chunk = self._envelope(self.chunk_object, [])
        chunk["usage"] = _usage(*finals)
        return [chunk]

    def error(self, error: TokenfleetError) -> dict[str, Any]:
        return {"error": {"message": str(error), "type": error.error_type, "param": None,
                          "code": None}}

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.request_id, "object": obj, "created": self.created,
               "model": self.model, "system_fingerprint": "tokenfleet", "choices": choices}
        if self.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def _usage_chunk(self, final: FinalEvent) -> list[dict[str, Any]]:
        return self.usage_chunks([final]) if self.own_usage else []

    def body(self, final: FinalEvent, tokens: list[TokenEvent]) -> Any:
        return self.body_many([final], [tokens])

    def body_many(self, finals: list[FinalEvent], tokens: list[list[TokenEvent]]) -> Any:
        out = self._envelope(self.body_object, [
            self._choice(index, final, events)
            for index, (final, events) in enumerate(zip(finals, tokens, strict=True))])
        out["usage"] = _usage(*finals)
        return out

    def _choice(self, index: int, final: FinalEvent, tokens: list[TokenEvent]
                ) -> dict[str, Any]:
        """Answer `index` of a whole response."""
        raise NotImplementedError


@dataclass
class ChatRenderer(_OpenAIRenderer):
    """`/v1/chat/completions`: `chat.completion` or `chat.completion.chunk` objects.

    With tools the answer is a JSON tool call, not text for the user: streamed as OpenAI's
    `tool_calls` deltas once it names its function (`ToolCallStream`), or, when the model
    chose no tool, sent at the end as content."""

    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"
    tools: ToolCallPlan | None = None
    _held: list[TokenEvent] = field(default_factory=list, init=False)  # tokens not yet sent
    _call: ToolCallStream | None = field(default=None, init=False)

    def chunks(self, event: TokenEvent | FinalEvent) -> list[dict[str, Any]]:
        if self.tools is not None:
            return self._tool_chunks(event)
        text = _text(event)
        # role on every delta: TGI's client types require it; OpenAI's SDK accepts it.
        delta = {"role": "assistant", "content": text, "tool_calls": None}
        return self._chunk(event, delta, finish_reason(event)
                           if isinstance(event, FinalEvent) else None, bool(text))

    def _tool_chunks(self, event: TokenEvent | FinalEvent) -> list[dict[str, Any]]:
        if self._call is None:
            self._call = ToolCallStream(self._call_id(self.choice_index))
        entries = self._call.push(_text(event))
        scored: list[TokenEvent | FinalEvent] = [*self._held, event]
        if not isinstance(event, FinalEvent):
            self._held.append(event)
            if not entries:
                return []
            self._held = []
            return self._chunk(event, {"role": "assistant", "content": None,
                                       "tool_calls": entries}, None, True, scored)
        message, reason = self._answer(event, self.choice_index)
        delta = {"role": "assistant", "content": message["content"], "tool_calls": None}
        if self._call.started:  # the rest of the arguments
            entries = _merged(entries + self._call.finish(
                complete=event.details.finish_reason == "eos_token"))  # grammar complete
            delta.update(content=None, tool_calls=entries or None)
        elif "tool_calls" in message:
            delta["tool_calls"] = [{"index": i, **call}
                                   for i, call in enumerate(message["tool_calls"])]
        return self._chunk(event, delta, reason, True, scored)

    def _chunk(self, event: TokenEvent | FinalEvent, delta: dict[str, Any],
               reason: str | None, send: bool,
               scored: list[TokenEvent | FinalEvent] | None = None) -> list[dict[str, Any]]:
        """`scored`: the events whose logprobs this chunk carries (default: `event`)."""
        logprobs = logprobs_content(scored or [event]) if self.logprobs else None
        choice: dict[str, Any] = {
            "index": self.choice_index, "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": reason,
        }
        if isinstance(event, FinalEvent):
            return [self._envelope(self.chunk_object, [choice]), *self._usage_chunk(event)]
        return [self._envelope(self.chunk_object, [choice])] if send else []

    def _answer(self, final: FinalEvent, index: int) -> tuple[dict[str, Any], str]:
        """Choice `index`'s assistant message and OpenAI's finish reason (`tool_calls` for a
        call)."""
        if self.tools is None:
            return ({"role": "assistant", "content": final.generated_text},
                    finish_reason(final))
        message, is_call = self.tools.message(final.generated_text, self._call_id(index))
        # OpenAI: "tool_calls" when the model chose to call (auto, required); "stop" when
        # the request named the function.
        called = is_call and not self.tools.named and final.details.finish_reason != "length"
        return message, "tool_calls" if called else finish_reason(final)

    def _call_id(self, index: int) -> str:
        """Unique per choice: n > 1 answers are separate calls."""
        suffix = f"-{index}" if index else ""
        return "call_" + self.request_id.removeprefix("chatcmpl-") + suffix

    def _choice(self, index: int, final: FinalEvent, tokens: list[TokenEvent]
                ) -> dict[str, Any]:
        logprobs = ({"content": logprobs_content([*tokens, final])} if self.logprobs
                    else None)
        message, reason = self._answer(final, index)
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": reason}


@dataclass
class CompletionRenderer(_OpenAIRenderer):
    """`/v1/completions`: `text_completion` objects (streamed or whole)."""

    chunk_object = body_object = "text_completion"
    echo_prompt: str = ""  # `echo`: streamed once, before the first token
    _offset: int = field(default=0, init=False)  # characters streamed, for `text_offset`

    def chunks(self, event: TokenEvent | FinalEvent) -> list[dict[str, Any]]:
        text = _text(event)
        prefix, self.echo_prompt = self.echo_prompt, ""
        choice: dict[str, Any] = {"index": self.choice_index, "text": prefix + text,
                                  "logprobs": None,
                                  "finish_reason": None}
        if self.logprobs:
            choice["logprobs"] = completion_logprobs([event], self._offset + len(prefix))
        self._offset += len(prefix) + len(text)
        if isinstance(event, FinalEvent):
            choice["finish_reason"] = finish_reason(event)
            return [self._envelope(self.chunk_object, [choice]), *self._usage_chunk(event)]
        return [self._envelope(self.chunk_object, [choice])] if choice["text"] else []

    def _choice(self, index: int, final: FinalEvent, tokens: list[TokenEvent]
                ) -> dict[str, Any]:
        logprobs = None
        if self.logprobs:
            # With `echo` the text starts with the prompt; offsets count from its end.
            events: list[TokenEvent | FinalEvent] = [*tokens, final]
            prompt_len = len(final.generated_text) - sum(len(_text(e)) for e in events)
            logprobs = completion_logprobs(events, max(prompt_len, 0))
        return {"index": index, "text": final.generated_text, "logprobs": logprobs,
                "finish_reason": finish_reason(final)}


def _merged(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several deltas of the one call in a chunk as one: the first, arguments joined."""
    if len(entries) <= 1:
        return entries
    first = {**entries[0], "function": dict(entries[0]["function"])}
    first["function"]["arguments"] = "".join(e["function"]["arguments"] for e in entries)
    return [first]


def _text(event: TokenEvent | FinalEvent) -> str:
    """The text an event adds to the answer (none for a special token, or no token)."""
    return "" if event.token is None or event.token.special else event.token.text


def _usage(*finals: FinalEvent) -> dict[str, int]:
    """One prompt (the copies of an n > 1 request share it), every answer's tokens."""
    prompt = finals[0].usage.prompt_tokens
    completion = sum(f.usage.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
