"""TGI's HTTP API shapes: `GenerateRequest` in, `GenerateResponse` / `StreamResponse` out.

The gateway's `/generate`, `/generate_stream` and `/` speak exactly these, so TGI's own
clients (`text_generation.Client`, `huggingface_hub.InferenceClient`) work unchanged. Our
event fields already follow TGI's names (DESIGN §2); the differences handled here:
- TGI numbers streamed tokens from 1, our events from 0;
- a stream's last response carries `details` only when the request asked for them;
- `details.top_tokens` is per generated token, collected from the token events.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tokenfleet.producer.errors import ValidationError
from tokenfleet.producer.protocol import FinalEvent, Parameters, Token, TokenEvent
from tokenfleet.producer.validation import logit_bias_from_json

__all__ = [
    "MAX_BEST_OF",
    "GenerateRequest",
    "best_of",
    "best_of_index",
    "best_of_response",
    "decode_generate_request",
    "generate_response",
    "job_arguments",
    "response_headers",
    "stream_response",
]

# TGI parameters we do not implement. Sent with a value that needs them, they fail with a
# validation error instead of being ignored: silently returning one sequence for best_of=4
# would be a wrong answer.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {"watermark": (None, False), "adapter_id": (None, "")}
MAX_BEST_OF = 8  # the default limit (TGI's --max-best-of: 2); each copy takes a fleet slot


class GenerateRequest(msgspec.Struct, kw_only=True):
    """TGI's request body; `parameters` stays a dict until `job_arguments` checks it."""

    inputs: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    stream: bool = False


_DECODER = msgspec.json.Decoder(GenerateRequest)


def decode_generate_request(body: bytes) -> GenerateRequest:
    """Parse a request body (raises ValidationError with msgspec's reason)."""
    try:
        return _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise ValidationError(f"Input validation error: invalid request body: {e}") from e


def best_of(request: GenerateRequest, *, stream: bool, max_best_of: int = MAX_BEST_OF) -> int:
    """How many sampled answers to choose the best of (TGI's rules and messages; the limit is
    the gateway's `gateway_max_best_of`, TGI's --max-best-of)."""
    value = request.parameters.get("best_of")
    if value is None or (value == 1 and not isinstance(value, bool)):
        return 1
    p = request.parameters
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= max_best_of:
        raise ValidationError(f"Input validation error: `best_of` must be > 0 and <= "
                              f"{max_best_of}. Given: {value!r}")
    sampling = (p.get("do_sample") or p.get("temperature") not in (None, 1.0)
                or p.get("top_k") is not None or p.get("top_p") not in (None, 1.0)
                or p.get("typical_p") not in (None, 1.0) or p.get("min_p") is not None)
    if not sampling or p.get("temperature") == 0:  # temperature 0 is greedy: n equal answers
        raise ValidationError("Input validation error: you must use sampling when `best_of` "
                              "is > 1")
    if p.get("seed") is not None:
        raise ValidationError("Input validation error: `seed` must not be set when `best_of` "
                              "> 1")
    if stream:
        raise ValidationError("Input validation error: `best_of` != 1 is not supported when "
                              "streaming tokens")
    return value


def best_of_index(finals: list[FinalEvent], tokens: list[list[TokenEvent]]) -> int:
    """Which answer TGI's best_of returns: the highest mean logprob of its tokens."""
    def mean_logprob(i: int) -> float:
        events: list[TokenEvent | FinalEvent] = [*tokens[i], finals[i]]
        lps = [e.token.logprob for e in events if e.token is not None
               and e.token.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")

    return max(range(len(finals)), key=mean_logprob)


def best_of_response(finals: list[FinalEvent], tokens: list[list[TokenEvent]], *,
                     details: bool) -> dict[str, Any]:
    """TGI's answer to best_of: the answer whose tokens have the highest mean logprob, the
    others in `details.best_of_sequences`."""
    best = best_of_index(finals, tokens)
    out = generate_response(finals[best], tokens[best], details=details)
    if details:
        out["details"]["best_of_sequences"] = [
            {"generated_text": finals[i].generated_text,
             **{k: v for k, v in generate_response(finals[i], tokens[i], details=True)[
                 "details"].items() if k != "best_of_sequences"}}
            for i in range(len(finals)) if i != best]
    return out


def job_arguments(request: GenerateRequest) -> dict[str, Any]:
    """`Client.build_job` keyword arguments for a TGI request (drops TGI-only knobs; `best_of`
    is the gateway's, see `best_of`)."""
    parameters = dict(request.parameters)
    parameters.pop("best_of", None)
    for name, allowed in _UNSUPPORTED_DEFAULTS.items():
        value = parameters.pop(name, None)
        if value not in allowed:
            raise ValidationError(
                f"Input validation error: `{name}` is not supported by tokenfleet (got {value!r})")
    # TGI clients send every field, null for "unset": let our defaults apply to those.
    known = {k: v for k, v in parameters.items()
             if k in Parameters.__struct_fields__ and v is not None}
    if "logit_bias" in known:  # JSON object keys are strings
        known["logit_bias"] = logit_bias_from_json(known["logit_bias"])
    return {"inputs": request.inputs, **known}


def stream_response(event: TokenEvent | FinalEvent, *, details: bool) -> dict[str, Any]:
    """One TGI `StreamResponse`; the final one adds `generated_text` (and `details`).

    A final event carries no token when its request was cancelled after its last token went
    out (or before the first): its response then has neither `token` nor `index`.
    """
    out: dict[str, Any] = {
        "index": None if event.index is None else event.index + 1,
        "token": _token(event.token),
        "top_tokens": [_token(t) for t in event.top_tokens],
        "generated_text": None,
        "details": None,
    }
    if isinstance(event, FinalEvent):
        out["generated_text"] = event.generated_text
        if details:
            out["details"] = {"finish_reason": event.details.finish_reason,
                              "generated_tokens": event.details.generated_tokens,
                              "seed": event.details.seed,
                              "input_length": event.usage.prompt_tokens}
    return out


def generate_response(final: FinalEvent, tokens: list[TokenEvent], *,
                      details: bool) -> dict[str, Any]:
    """TGI's `GenerateResponse` for a finished request (`tokens`: its token events)."""
    out: dict[str, Any] = {"generated_text": final.generated_text}
    if not details:
        return out
    d = final.details
    top_tokens = [[_token(t) for t in e.top_tokens] for e in tokens]
    if final.token is not None:
        top_tokens.append([_token(t) for t in final.top_tokens])
    out["details"] = {
        "finish_reason": d.finish_reason,
        "generated_tokens": d.generated_tokens,
        "seed": d.seed,
        "prefill": [msgspec.to_builtins(t) for t in d.prefill],
        "tokens": [_token(t) for t in d.tokens],
        "top_tokens": top_tokens if any(top_tokens) else None,
        "best_of_sequences": None,
    }
    return out


def _token(token: Token | None) -> dict[str, Any] | None:
    return None if token is None else msgspec.to_builtins(token)


def response_headers(final: FinalEvent) -> dict[str, str]:
    """TGI's response headers (milliseconds), from the final event's timings."""
    n = final.details.generated_tokens
    inference_ms = max(final.total_ms - final.queue_ms, 0.0)
    decode_ms = final.total_ms - (final.ttft_ms or final.total_ms)
    return {
        "x-request-id": final.id,
        "x-compute-type": "tokenfleet",
        "x-total-time": str(round(final.total_ms)),
        "x-queue-time": str(round(final.queue_ms)),
        "x-inference-time": str(round(inference_ms)),
        "x-time-per-token": str(round(decode_ms / (n - 1)) if n > 1 else 0),
        "x-prompt-tokens": str(final.usage.prompt_tokens),
        "x-generated-tokens": str(n),
    }
