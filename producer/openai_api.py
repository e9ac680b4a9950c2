"""OpenAI's chat-completions and completions shapes, mapped onto jobs and events.

The mapping follows OpenAI's semantics, not TGI's parameter names: `temperature` defaults to
1 (sampling) and 0 means greedy; `stop` may be one string; `max_tokens` (or
`max_completion_tokens`) left out means the gateway's `default_max_tokens`, because the
gateway holds no tokenizer to compute "the rest of the context". vLLM's extensions `top_k`,
`min_p` and `repetition_penalty` are accepted. `response_format` constrains the output:
`json_object` (any JSON object), `json_schema` (OpenAI's structured outputs), and TGI's
`json` / `regex` grammars; `tools` become a grammar too (`tool_calls.py`). `n` > 1 runs that
many jobs; `logit_bias` (token ids of the served model's tokenizer) is applied by the worker.
Fields that would change the answer and that we do not implement are refused with a
validation error rather than ignored.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from tokenfleet.producer.errors import ValidationError
from tokenfleet.producer.protocol import FinalEvent, Token, TokenEvent
from tokenfleet.producer.tool_calls import ToolCallPlan
from tokenfleet.producer.validation import logit_bias_from_json

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "chat_job_arguments",
    "completion_job_arguments",
    "completion_logprobs",
    "finish_reason",
    "include_usage",
    "logprobs_content",
    "num_choices",
    "response_format_grammar",
]

# Our finish reasons -> OpenAI's; a cancelled request stopped early, like a stop sequence.
_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "stop"}


class _Sampling(msgspec.Struct, kw_only=True):
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    top_k: int | None = None  # vLLM extension
    min_p: float | None = None  # vLLM extension
    repetition_penalty: float | None = None  # vLLM / TGI extension
    response_format: dict[str, Any] | None = None  # on completions too, as vLLM


class ChatRequest(_Sampling, kw_only=True):
    """POST /v1/chat/completions body."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    tool_prompt: str | None = None  # TGI extension: the text that introduces the tools


class CompletionRequest(_Sampling, kw_only=True):
    """POST /v1/completions body (one prompt)."""

    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = None


def decode(body: bytes, kind: type[ChatRequest] | type[CompletionRequest]) -> Any:
    """Parse a request body (raises ValidationError with msgspec's reason)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise ValidationError(f"Input validation error: invalid request body: {e}") from e


def chat_job_arguments(req: ChatRequest, default_max_tokens: int,
                       tools: ToolCallPlan | None = None) -> dict[str, Any]:
    """`Client.build_job` keyword arguments for a chat request (`tools`: its plan, from
    `ToolCallPlan.build(req.tools, req.tool_choice)`)."""
    args = _sampling(req, _first_set(req.max_completion_tokens, req.max_tokens,
                                     default_max_tokens))
    args["messages"] = [_message(m) for m in req.messages]
    if tools is not None:
        if "grammar" in args:
            raise ValidationError("Input validation error: `tools` and a JSON or regex "
                                  "`response_format` cannot be combined")
        args["grammar"] = tools.grammar()
        _append_to_last_user_message(args["messages"], tools.prompt(req.tool_prompt))
    if req.logprobs:
        args["top_n_tokens"] = req.top_logprobs or None
    elif req.top_logprobs:
        raise ValidationError("Input validation error: `top_logprobs` needs `logprobs: true`")
    return args


def completion_job_arguments(req: CompletionRequest, default_max_tokens: int
                             ) -> dict[str, Any]:
    """`Client.build_job` keyword arguments for a completions request."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ValidationError("Input validation error: `prompt` must be one string "
                                  "(send several requests for several prompts)")
        prompt = prompt[0]
    args = _sampling(req, _first_set(req.max_tokens, default_max_tokens))
    args["inputs"] = prompt
    args["return_full_text"] = bool(req.echo)
    if req.logprobs is not None:  # 0 = the chosen tokens' logprobs, no alternatives
        args["top_n_tokens"] = req.logprobs
    return args


def include_usage(body: ChatRequest | CompletionRequest) -> bool:
    """Whole responses always carry `usage`; streams only with `stream_options.include_usage`
    (as a last chunk with no choices)."""
    return bool((body.stream_options or {}).get("include_usage")) or not body.stream


def finish_reason(final: FinalEvent) -> str:
    return _FINISH.get(final.details.finish_reason, "stop")


def logprobs_content(events: list[TokenEvent | FinalEvent]) -> list[dict[str, Any]]:
    """The chat `logprobs.content` list: one entry per generated (non-special) token."""
    out = []
    for e in events:
        if e.token is None or e.token.special:
            continue
        entry = _logprob(e.token)
        entry["top_logprobs"] = [_logprob(t) for t in e.top_tokens]
        out.append(entry)
    return out


def completion_logprobs(events: list[TokenEvent | FinalEvent], text_offset: int = 0
                        ) -> dict[str, list[Any]]:
    """The legacy completions `logprobs` object (tokens, their logprobs, top alternatives)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for e in events:
        if e.token is None or e.token.special:
            continue
        out["tokens"].append(e.token.text)
        out["token_logprobs"].append(e.token.logprob)
        out["top_logprobs"].append({t.text: t.logprob for t in e.top_tokens})
        out["text_offset"].append(text_offset)
        text_offset += len(e.token.text)
    return out


MAX_N = 8  # the default limit on answers per request: each is a job of its own in the fleet


def num_choices(req: ChatRequest | CompletionRequest, max_n: int = MAX_N) -> int:
    """OpenAI's `n`: that many answers, each its own job (a seeded request's copies use
    seed, seed + 1, ...); streamed, their chunks interleave, each with its choice index."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= max_n:
        raise ValidationError(f"Input validation error: `n` must be >= 1 and <= {max_n}")
    return n


def _sampling(req: _Sampling, max_tokens: int) -> dict[str, Any]:
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0:
        raise ValidationError("Input validation error: `temperature` must be >= 0")
    args: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
    grammar = response_format_grammar(req.response_format)
    if grammar is not None:
        args["grammar"] = grammar
    if req.logit_bias:
        args["logit_bias"] = logit_bias_from_json(req.logit_bias)
    if temperature > 0:
        args["temperature"] = temperature
    if req.top_p is not None and req.top_p != 1.0:
        args["top_p"] = req.top_p  # out of (0, 1]: refused by the job's validation
    if req.stop:
        args["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    for name in ("seed", "frequency_penalty", "presence_penalty", "top_k", "min_p",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            args[name] = value
    return args


def response_format_grammar(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """TGI's `grammar` for an OpenAI `response_format` (None for plain text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # OpenAI's JSON mode; TGI's older spelling carries a schema
        return {"type": "json", "value": response_format.get("value") or {"type": "object"}}
    if kind == "json_schema" and "json_schema" in response_format:  # OpenAI's shape
        spec = response_format["json_schema"]
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValidationError("Input validation error: `response_format.json_schema` needs "
                                  "a `schema` object")
        return {"type": "json_schema", "value": {"name": spec.get("name"),
                                                 "schema": spec["schema"]}}
    if kind in ("json", "regex", "json_schema"):  # TGI's grammar, as TGI's chat API takes it
        return {"type": kind, "value": response_format.get("value")}
    raise ValidationError("Input validation error: `response_format` `type` must be one of "
                          "text, json_object, json_schema, json, regex")


def _append_to_last_user_message(messages: list[dict[str, str]], text: str) -> None:
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] = f"{message['content']}\n\n{text}"
            return
    messages.append({"role": "user", "content": text})


def _message(message: dict[str, Any]) -> dict[str, str]:
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str):
        raise ValidationError("Input validation error: every message needs a string `role`")
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        # An earlier turn's tool call: shown to the model as the JSON it answered then
        # (after the text, if the turn had both).
        text = _content_text(content)
        return {"role": role, "content": f"{text}\n{_calls_as_text(calls)}" if text
                else _calls_as_text(calls)}
    return {"role": role, "content": _content_text(content)}


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValidationError("Input validation error: only text content parts are "
                                      "supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValidationError("Input validation error: a text part needs a string "
                                      "`text`")
            texts.append(text)
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ValidationError("Input validation error: message `content` must be a string "
                              "or a list of text parts")
    return content


def _calls_as_text(calls: Any) -> str:
    try:
        shown = [{"name": c["function"]["name"],
                  "arguments": json.loads(c["function"].get("arguments") or "{}")}
                 for c in calls]
    except (TypeError, KeyError, ValueError):
        raise ValidationError("Input validation error: an assistant message's `tool_calls` "
                              "need `function.name` and JSON `function.arguments`") from None
    return json.dumps(shown[0] if len(shown) == 1 else shown)


def _first_set(*values: int | None) -> int:
    """The first value that is not None (0 included: the job's validation refuses it)."""
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is the gateway's default")


def _logprob(token: Token) -> dict[str, Any]:
    return {"token": token.text, "logprob": token.logprob,
            "bytes": list(token.text.encode())}
