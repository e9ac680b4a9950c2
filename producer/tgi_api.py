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

__all__ = [
    "GenerateRequest",
    "decode_generate_request",
    "generate_response",
    "job_arguments",
    "response_headers",
    "stream_response",
]

# TGI parameters we do not implement. Sent with a value that needs them, they fail with a
# validation error instead of being ignored: silently returning one sequence for best_of=4
# would be a wrong answer.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {"best_of": (None, 1), "watermark": (None, False),
                                         "adapter_id": (None, "")}


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


def job_arguments(request: GenerateRequest) -> dict[str, Any]:
    """`Client.build_job` keyword arguments for a TGI request (drops TGI-only knobs)."""
    parameters = dict(request.parameters)
    for name, allowed in _UNSUPPORTED_DEFAULTS.items():
        value = parameters.pop(name, None)
        if value not in allowed:
            raise ValidationError(
                f"Input validation error: `{name}` is not supported by tokenfleet (got {value!r})")
    # TGI clients send every field, null for "unset": let our defaults apply to those.
    known = {k: v for k, v in parameters.items()
             if k in Parameters.__struct_fields__ and v is not None}
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
