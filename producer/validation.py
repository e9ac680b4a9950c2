"""Client-side validation, so a bad request fails at submit instead of in a worker.

The parameter rules are a copy of `tokenfleet.engine.sampling_params.SamplingParams.validate`
(the producer must not import the engine: a web backend installs no torch);
`tests/unit/test_protocol.py` checks both agree on a table of good and bad values.
Workers validate again with the engine's own rules: the stream is never trusted.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from tokenfleet.producer.errors import ValidationError
from tokenfleet.producer.protocol import Grammar, Job, Parameters

__all__ = [
    "MAX_REQUEST_ID_LEN",
    "MAX_STOP_SEQUENCES",
    "MAX_TOP_N_TOKENS",
    "logit_bias_from_json",
    "validate_job",
    "validate_parameters",
    "validate_request_id",
]

MAX_STOP_SEQUENCES: Final = 16  # same as the engine's
MAX_TOP_N_TOKENS: Final = 5  # same as the engine's
MAX_REQUEST_ID_LEN: Final = 200
GRAMMAR_TYPES: Final = ("json", "regex", "json_schema")  # same as the engine's
MAX_GRAMMAR_CHARS: Final = 64 * 1024  # same as the engine's
MAX_LOGIT_BIAS: Final = 1024  # same as the engine's
# Ids become part of Redis key names inside a hash tag: no braces, no whitespace.
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:@/+=-]+")


def _is_key_name(value: object) -> bool:
    """Usable inside a Redis key name (request ids, owner ids)."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_LEN
            and _REQUEST_ID_RE.fullmatch(value) is not None)


def validate_request_id(request_id: object) -> str:
    """Return the id if it is usable in key names, else raise ValidationError."""
    if not _is_key_name(request_id):
        raise ValidationError(
            f"Input validation error: request id must be 1-{MAX_REQUEST_ID_LEN} characters "
            f"of [A-Za-z0-9._:@/+=-], got {request_id!r}"
        )
    assert isinstance(request_id, str)
    return request_id


def validate_job(job: Job) -> None:
    """Raise ValidationError unless the job is well-formed and its parameters are in range."""
    validate_request_id(job.id)
    _check((job.inputs is None) != (job.messages is None),
           "exactly one of `inputs` or `messages` must be given")
    _check(job.inputs is None or len(job.inputs) > 0, "`inputs` cannot be empty")
    _check(job.messages is None or len(job.messages) > 0, "`messages` cannot be empty")
    _check(job.deadline_ms is None or job.deadline_ms > 0, "`deadline_ms` must be positive")
    _check(job.owner is None or _is_key_name(job.owner),
           f"`owner` must be 1-{MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:@/+=-]")
    validate_parameters(job.parameters)


def validate_parameters(p: Parameters) -> None:
    """Raise ValidationError with TGI-like messages for out-of-range values."""
    _check(_is_int(p.max_new_tokens) and p.max_new_tokens > 0,
           "`max_new_tokens` must be strictly positive")
    _check(_is_int(p.min_new_tokens) and p.min_new_tokens >= 0,
           "`min_new_tokens` must be >= 0")
    _check(p.min_new_tokens <= p.max_new_tokens,
           "`min_new_tokens` must be <= `max_new_tokens`")
    _check(p.temperature is None or p.temperature >= 0, "`temperature` must be >= 0")
    _check(p.top_k is None or p.top_k > 0, "`top_k` must be strictly positive")
    _check(p.top_p is None or 0.0 < p.top_p <= 1.0, "`top_p` must be > 0.0 and <= 1.0")
    _check(p.typical_p is None or 0.0 < p.typical_p <= 1.0,
           "`typical_p` must be > 0.0 and <= 1.0")
    _check(p.min_p is None or 0.0 <= p.min_p < 1.0, "`min_p` must be >= 0.0 and < 1.0")
    _check(p.repetition_penalty is None or p.repetition_penalty > 0,
           "`repetition_penalty` must be strictly positive")
    _check(p.frequency_penalty is None or -2.0 <= p.frequency_penalty <= 2.0,
           "`frequency_penalty` must be >= -2.0 and <= 2.0")
    _check(p.presence_penalty is None or -2.0 <= p.presence_penalty <= 2.0,
           "`presence_penalty` must be >= -2.0 and <= 2.0")
    _check(len(p.stop) <= MAX_STOP_SEQUENCES,
           f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}")
    _check(all(isinstance(s, str) and s for s in p.stop),
           "`stop` sequences must be non-empty strings")
    _check(all(_is_int(t) and t >= 0 for t in p.stop_token_ids),
           "`stop_token_ids` must be non-negative integers")
    _check(p.seed is None or (_is_int(p.seed) and 0 <= p.seed < 2**64),
           "`seed` must be an integer in [0, 2**64)")
    _check(p.truncate is None or p.truncate > 0, "`truncate` must be strictly positive")
    _check(p.top_n_tokens is None or 0 <= p.top_n_tokens <= MAX_TOP_N_TOKENS,
           f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}")
    if p.grammar is not None:
        _validate_grammar(p.grammar)
    _check(len(p.logit_bias) <= MAX_LOGIT_BIAS,
           f"`logit_bias` supports up to {MAX_LOGIT_BIAS} tokens")
    _check(all(_is_int(t) and t >= 0 for t in p.logit_bias),
           "`logit_bias` keys must be token ids (>= 0)")
    _check(all(isinstance(b, int | float) and -100 <= b <= 100 for b in p.logit_bias.values()),
           "`logit_bias` values must be >= -100 and <= 100")


def logit_bias_from_json(bias: object) -> dict[int, float]:
    """`{"<token id>": bias}` as JSON has it (keys are strings) -> token id -> bias; the
    ranges are checked by `validate_parameters`."""
    if not isinstance(bias, dict):
        raise ValidationError("Input validation error: `logit_bias` must map token ids to "
                              "numbers")
    try:
        return {int(token): _number(value) for token, value in bias.items()}
    except (TypeError, ValueError, OverflowError):
        raise ValidationError("Input validation error: `logit_bias` must map token ids to "
                              "numbers") from None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    return float(value)


def _validate_grammar(g: Grammar) -> None:
    """The shape of TGI's `grammar` (the engine's `Grammar.validate`); whether the schema or
    regex compiles is known only to a worker (it answers a validation error if not)."""
    _check(g.type in GRAMMAR_TYPES,
           f"`grammar` `type` must be one of {list(GRAMMAR_TYPES)}, got {g.type!r}")
    if g.type == "regex":
        _check(isinstance(g.value, str) and bool(g.value),
               "`grammar` a regex grammar's `value` must be a non-empty string")
        text = str(g.value)
    else:
        text = json.dumps(_grammar_schema(g), separators=(",", ":"), sort_keys=True)
    _check(len(text) <= MAX_GRAMMAR_CHARS,
           f"`grammar` is longer than {MAX_GRAMMAR_CHARS} characters")


def _grammar_schema(g: Grammar) -> Any:
    value = g.value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValidationError(
                f"Input validation error: `grammar` `value` is not valid JSON: {e}") from None
    if g.type == "json_schema":
        _check(isinstance(value, dict) and isinstance(value.get("schema"), dict),
               "`grammar` a json_schema grammar's `value` must be {\"schema\": {...}}")
        value = value["schema"]
    _check(isinstance(value, dict), "`grammar` a JSON grammar's `value` must be a JSON schema "
           "object")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(f"Input validation error: {message}")
