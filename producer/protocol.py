"""The wire contract: jobs on the queue stream, events on a request's channel (DESIGN §2).

Everything here is JSON via msgspec so any language can enqueue and subscribe. Field names
follow TGI (`GenerateRequest{inputs, parameters}`, `StreamResponse`), so a `token` or `final`
event parses unchanged as `text_generation.types.StreamResponse`: a `final` event is TGI's
last StreamResponse, i.e. it carries the request's last token as well as `generated_text` and
`details`. Concatenating the token texts of all token events and the final event gives
`generated_text`.

Schema evolution: every field added later gets a default, unknown fields are ignored (no
`forbid_unknown_fields` anywhere), unknown event kinds decode to None, and `v` bumps only on a
breaking change. Encoders and decoders are built once per process.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = [
    "ERROR_TYPES",
    "FINISH_REASONS",
    "MUST_UNDERSTAND",
    "PROTOCOL_VERSION",
    "CancelCommand",
    "ControlMessage",
    "ErrorEvent",
    "Event",
    "FinalDetails",
    "FinalEvent",
    "InputToken",
    "Job",
    "Message",
    "Parameters",
    "Token",
    "TokenEvent",
    "Usage",
    "WorkerInfo",
    "decode_control",
    "decode_event",
    "decode_job",
    "decode_worker_info",
    "encode",
]

# The newest job version this code reads. A job's `v` is the oldest version that can serve it
# right: 1, or the version that added a parameter it uses that a worker must not ignore
# (an older worker would answer something else; it refuses a newer job with a validation
# error instead).
PROTOCOL_VERSION: Final = 2
MUST_UNDERSTAND: Final = {"grammar": 2, "logit_bias": 2}  # parameter -> version that added it
FINISH_REASONS: Final = ("length", "eos_token", "stop_sequence", "cancelled")
ERROR_TYPES: Final = (
    "validation",
    "overloaded",
    "generation",
    "incomplete_generation",
    "deadline_exceeded",
)


class Grammar(msgspec.Struct, kw_only=True):
    """Constrain the output (TGI's `grammar`): `type` "json" with `value` a JSON schema (or that
    schema as a JSON string), "regex" with `value` the pattern, or "json_schema" with `value`
    `{"name": ..., "schema": {...}}`. A job with a grammar says `v` 2: a worker that predates
    the field refuses it instead of answering unconstrained (see `PROTOCOL_VERSION`)."""

    type: str
    value: Any


class Parameters(msgspec.Struct, kw_only=True):
    """Generation parameters, TGI's `GenerateParameters` names and defaults.

    Types are checked when decoding; value ranges by `producer.validation`
    (which mirrors the engine's `SamplingParams.validate`).
    """

    max_new_tokens: int = 100
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    seed: int | None = None
    truncate: int | None = None
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = None
    ignore_eos: bool = False
    grammar: Grammar | None = None
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)  # token id -> bias


class Message(msgspec.Struct, kw_only=True):
    """One OpenAI-style chat message; rendered with the model's chat template."""

    role: str
    content: str


class Job(msgspec.Struct, kw_only=True):
    """One generation request: the single field `job` of a queue stream entry.

    Exactly one of `inputs` (a raw prompt) or `messages` (a chat) is set.
    `deadline_ms` and `submitted_ms` are Unix epoch milliseconds.
    """

    id: str
    v: int = 1
    model: str = ""  # "" = whatever model the queue's workers serve
    inputs: str | None = None
    messages: list[Message] | None = None
    parameters: Parameters = msgspec.field(default_factory=Parameters)
    priority: int = 0
    deadline_ms: int | None = None
    tenant: str | None = None
    submitted_ms: int = 0
    # The producer whose client reads this job's events (a gateway, for a request sent
    # without an Idempotency-Key): while `Keys.owner(owner)` exists it is alive; once that key
    # has been gone for a while, workers cancel the job, since nobody can read it any more.
    # Not must-understand: a worker that ignores it only runs such a job to its end.
    owner: str | None = None

    def __post_init__(self) -> None:
        for name, version in MUST_UNDERSTAND.items():
            if getattr(self.parameters, name):
                self.v = max(self.v, version)


class Token(msgspec.Struct, kw_only=True):
    """A generated token (TGI's `Token`). `special` tokens (EOS …) have text ""."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class InputToken(msgspec.Struct, kw_only=True):
    """A prompt token in `details.prefill` (TGI's `InputToken`)."""

    id: int
    text: str
    logprob: float | None = None


class TokenEvent(msgspec.Struct, kw_only=True, tag_field="kind", tag="token"):
    """One generated token; `index` counts generated tokens from 0."""

    id: str
    index: int
    token: Token
    top_tokens: list[Token] = msgspec.field(default_factory=list)
    # Epoch ms when the worker published it: publish -> receive latency, same-clock hosts only.
    published_ms: float | None = None


class FinalDetails(msgspec.Struct, kw_only=True):
    """TGI's `details`; `prefill` and `tokens` are filled only when asked for."""

    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = msgspec.field(default_factory=list)
    tokens: list[Token] = msgspec.field(default_factory=list)


class Usage(msgspec.Struct, kw_only=True):
    """Token accounting, OpenAI-style."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class FinalEvent(msgspec.Struct, kw_only=True, tag_field="kind", tag="final"):
    """The last event of a finished request (TGI's last StreamResponse).

    `token`/`index` are the request's last generated token; both are None only when no token
    was generated (e.g. cancelled before the first one). Timings are milliseconds since the
    job's `submitted_ms`.
    """

    id: str
    index: int | None = None
    token: Token | None = None
    top_tokens: list[Token] = msgspec.field(default_factory=list)
    generated_text: str
    details: FinalDetails
    usage: Usage = msgspec.field(default_factory=Usage)
    queue_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0


class ErrorEvent(msgspec.Struct, kw_only=True, tag_field="kind", tag="error"):
    """A request failed; `error_type` is one of ERROR_TYPES (TGI's plus deadline_exceeded)."""

    id: str
    error: str
    error_type: str = "generation"


Event = TokenEvent | FinalEvent | ErrorEvent


class CancelCommand(msgspec.Struct, kw_only=True, tag_field="kind", tag="cancel"):
    """Published on the control channel: the holding worker aborts the request."""

    id: str


ControlMessage = CancelCommand


class WorkerInfo(msgspec.Struct, kw_only=True):
    """A worker's heartbeat, stored under `Keys.worker(worker_id)` with a TTL."""

    worker_id: str
    model: str = ""
    queue: str = ""
    version: str = ""
    host: str = ""
    pid: int = 0
    num_running: int = 0
    num_waiting: int = 0
    max_num_seqs: int = 0
    kv_usage: float = 0.0
    num_free_kv_blocks: int = 0
    num_total_kv_blocks: int = 0
    tokens_per_s: float = 0.0
    num_finished: int = 0
    draining: bool = False
    started_ms: int = 0
    updated_ms: int = 0


class _Kind(msgspec.Struct):
    """Just the tag, to tell an unknown event kind from a malformed event."""

    kind: str


_ENCODER: Final = msgspec.json.Encoder()
_JOB_DECODER: Final = msgspec.json.Decoder(Job)
_EVENT_DECODER: Final = msgspec.json.Decoder(Event)
_KIND_DECODER: Final = msgspec.json.Decoder(_Kind)
_CONTROL_DECODER: Final = msgspec.json.Decoder(ControlMessage)
_WORKER_DECODER: Final = msgspec.json.Decoder(WorkerInfo)
_KNOWN_EVENT_KINDS: Final = frozenset({"token", "final", "error"})


def encode(message: Any) -> bytes:
    """Encode any wire Struct (or plain data) as JSON bytes."""
    return _ENCODER.encode(message)


def decode_job(data: bytes | str) -> Job:
    """Decode a job; raises msgspec.DecodeError / msgspec.ValidationError when malformed."""
    try:
        return _JOB_DECODER.decode(data)
    except UnicodeDecodeError as e:  # msgspec raises it for invalid UTF-8 inside a string
        raise msgspec.DecodeError(f"invalid UTF-8: {e}") from e


def decode_event(data: bytes | str) -> Event | None:
    """Decode an event; None for a kind this reader does not know (a newer worker's).

    Raises msgspec.DecodeError / msgspec.ValidationError when a known kind is malformed.
    """
    try:
        return _EVENT_DECODER.decode(data)
    except msgspec.ValidationError:
        if _KIND_DECODER.decode(data).kind in _KNOWN_EVENT_KINDS:
            raise
        return None
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"invalid UTF-8: {e}") from e


def decode_control(data: bytes | str) -> ControlMessage | None:
    """Decode a control-channel message; None for anything this reader does not know."""
    try:
        return _CONTROL_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return None


def decode_worker_info(data: bytes | str) -> WorkerInfo:
    """Decode a worker heartbeat (raises msgspec.DecodeError / ValidationError)."""
    try:
        return _WORKER_DECODER.decode(data)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"invalid UTF-8: {e}") from e
