"""The wire contract: TGI compatibility, schema evolution, and validation that agrees with the
engine's own rules."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import msgspec
import pytest
from text_generation.types import StreamResponse

from tokenfleet.engine.errors import ValidationError as EngineValidationError
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.producer import protocol
from tokenfleet.producer.errors import (
    DeadlineExceededError,
    GenerationError,
    OverloadedError,
    ValidationError,
    error_class,
)
from tokenfleet.producer.protocol import (
    CancelCommand,
    ErrorEvent,
    FinalDetails,
    FinalEvent,
    Grammar,
    Job,
    Message,
    Parameters,
    Token,
    TokenEvent,
    decode_control,
    decode_event,
    decode_job,
    encode,
)
from tokenfleet.producer.validation import validate_job, validate_parameters

TOKEN = TokenEvent(id="r1", index=3, token=Token(id=42, text=" Paris", logprob=-0.25),
                   top_tokens=[Token(id=42, text=" Paris", logprob=-0.25)])
FINAL = FinalEvent(id="r1", index=4, token=Token(id=2, text="", logprob=-0.1, special=True),
                   generated_text="The capital is Paris.",
                   details=FinalDetails(finish_reason="eos_token", generated_tokens=5, seed=7))


def test_token_and_final_events_parse_as_tgi_stream_responses():
    token = StreamResponse(**json.loads(encode(TOKEN)))
    assert (token.token.id, token.token.text, token.token.special) == (42, " Paris", False)
    assert token.generated_text is None and token.details is None
    assert token.top_tokens[0].logprob == -0.25
    final = StreamResponse(**json.loads(encode(FINAL)))
    assert final.generated_text == "The capital is Paris."
    assert final.details.finish_reason.value == "eos_token"
    assert (final.details.generated_tokens, final.details.seed) == (5, 7)
    assert final.token.special


@pytest.mark.parametrize("event", [TOKEN, FINAL, ErrorEvent(id="r1", error="boom",
                                                               error_type="overloaded")])
def test_events_round_trip_through_the_tagged_union(event):
    data = encode(event)
    assert json.loads(data)["kind"] == {TokenEvent: "token", FinalEvent: "final",
                                        ErrorEvent: "error"}[type(event)]
    assert decode_event(data) == event


def test_job_round_trip_and_defaults():
    job = Job(id="j", model="smollm2", messages=[Message(role="user", content="hi")],
              parameters=Parameters(max_new_tokens=7, stop=["\n"], seed=3), priority=2,
              deadline_ms=123, tenant="acme", submitted_ms=100)
    assert decode_job(encode(job)) == job
    minimal = decode_job(b'{"id": "j", "inputs": "hi"}')  # what a non-Python producer sends
    assert minimal.v == 1  # a job without grammar is served by any worker
    assert minimal.parameters == Parameters()
    assert minimal.parameters.max_new_tokens == 100
    assert minimal.messages is None and minimal.deadline_ms is None


def test_old_reader_ignores_new_fields_and_new_reader_defaults_missing_ones():
    class FutureTokenEvent(msgspec.Struct, kw_only=True, tag_field="kind", tag="token"):
        id: str
        index: int
        token: Token
        top_tokens: list[Token] = []
        worker: str = "w7"  # a field a later version adds
        timing_us: int = 5

    newer = encode(FutureTokenEvent(id="r", index=0, token=Token(id=1, text="a")))
    assert decode_event(newer) == TokenEvent(id="r", index=0, token=Token(id=1, text="a"))
    job = json.loads(encode(Job(id="j", inputs="x")))
    job["parameters"]["brand_new_knob"] = 0.5
    job["routing"] = {"zone": "eu"}
    assert decode_job(json.dumps(job)).parameters == Parameters()
    older = b'{"kind":"final","id":"r","generated_text":"","details":{"finish_reason":"length",' \
            b'"generated_tokens":0}}'
    final = decode_event(older)
    assert isinstance(final, FinalEvent)
    assert final.usage.total_tokens == 0 and final.index is None and final.top_tokens == []


def test_no_wire_struct_forbids_unknown_fields():
    structs = [obj for obj in vars(protocol).values()
               if isinstance(obj, type) and issubclass(obj, msgspec.Struct)]
    assert len(structs) >= 10
    assert not any(s.__struct_config__.forbid_unknown_fields for s in structs)


def test_unknown_event_kinds_are_skipped_but_malformed_known_ones_raise():
    assert decode_event(b'{"kind": "progress", "id": "r", "pct": 3}') is None
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"kind": "token", "id": "r", "index": "three"}')
    with pytest.raises(msgspec.DecodeError):
        decode_event(b"not json")
    assert decode_control(encode(CancelCommand(id="r"))) == CancelCommand(id="r")
    assert decode_control(b'{"kind": "drain"}') is None
    assert decode_control(b"garbage") is None


def test_parameters_mirror_sampling_params_names_and_defaults():
    engine_defaults = {f.name: getattr(SamplingParams(), f.name)
                       for f in dataclasses.fields(SamplingParams)}
    ours = msgspec.structs.asdict(Parameters())
    assert set(ours) == set(engine_defaults) - {"logprobs"}
    assert ours == {k: engine_defaults[k] for k in ours}


# (parameters, valid?) — each row is checked against the engine's own SamplingParams.
VALIDATION_TABLE = [
    ({}, True),
    ({"max_new_tokens": 1}, True),
    ({"max_new_tokens": 0}, False),
    ({"max_new_tokens": -5}, False),
    ({"min_new_tokens": 3, "max_new_tokens": 2}, False),
    ({"min_new_tokens": -1}, False),
    ({"temperature": 0.0}, True),
    ({"temperature": -0.1}, False),
    ({"top_k": 0}, False),
    ({"top_k": 40}, True),
    ({"top_p": 1.0}, True),
    ({"top_p": 0.0}, False),
    ({"top_p": 1.01}, False),
    ({"typical_p": 0.5}, True),
    ({"typical_p": 0.0}, False),
    ({"min_p": 0.0}, True),
    ({"min_p": 1.0}, False),
    ({"repetition_penalty": 0.0}, False),
    ({"repetition_penalty": 1.2}, True),
    ({"frequency_penalty": 2.0}, True),
    ({"frequency_penalty": 2.5}, False),
    ({"presence_penalty": -2.5}, False),
    ({"stop": ["a"] * 16}, True),
    ({"stop": ["a"] * 17}, False),
    ({"stop": [""]}, False),
    ({"stop_token_ids": [0, 5]}, True),
    ({"stop_token_ids": [-1]}, False),
    ({"seed": 2**64 - 1}, True),
    ({"seed": 2**64}, False),
    ({"seed": -1}, False),
    ({"truncate": 0}, False),
    ({"truncate": 10}, True),
    ({"top_n_tokens": 5}, True),
    ({"top_n_tokens": 6}, False),
    ({"logit_bias": {5: 100, 7: -100.0}}, True),
    ({"logit_bias": {5: 100.5}}, False),
    ({"logit_bias": {-1: 1.0}}, False),
    ({"logit_bias": dict.fromkeys(range(1025), 1.0)}, False),
]


@pytest.mark.parametrize(("params", "valid"), VALIDATION_TABLE)
def test_client_validation_agrees_with_the_engine(params, valid):
    engine_error = producer_error = None
    try:
        SamplingParams(**params)
    except EngineValidationError as e:
        engine_error = str(e)
    try:
        validate_parameters(Parameters(**params))
    except ValidationError as e:
        producer_error = str(e)
    assert (engine_error is None) == valid
    assert producer_error == engine_error


GRAMMAR_TABLE = [
    ({"type": "json", "value": {"type": "object"}}, True),
    ({"type": "json", "value": '{"type": "integer"}'}, True),
    ({"type": "json", "value": "{not json"}, False),
    ({"type": "json", "value": [1]}, False),
    ({"type": "json_schema", "value": {"name": "n", "schema": {"type": "object"}}}, True),
    ({"type": "json_schema", "value": {"name": "n"}}, False),
    ({"type": "regex", "value": "[a-z]+"}, True),
    ({"type": "regex", "value": ""}, False),
    ({"type": "regex", "value": 5}, False),
    ({"type": "regex", "value": "a" * 70_000}, False),
    ({"type": "yaml", "value": "x"}, False),
]


@pytest.mark.parametrize(("grammar", "valid"), GRAMMAR_TABLE)
def test_grammar_validation_agrees_with_the_engine(grammar, valid):
    """Shape only on both sides: whether a regex or schema compiles is the worker's call."""
    engine_error = producer_error = None
    try:
        SamplingParams(grammar=grammar)
    except EngineValidationError as e:
        engine_error = str(e)
    try:
        validate_parameters(msgspec.convert({"grammar": grammar}, Parameters))
    except ValidationError as e:
        producer_error = str(e)
    assert (engine_error is None) == valid
    assert producer_error == engine_error


def test_a_job_with_grammar_needs_a_grammar_aware_worker():
    """A v1 worker ignores fields it does not know: it would answer a grammar job with free
    text. Such jobs say v2, which a v1 worker refuses with a validation error (the same for
    logit_bias)."""
    plain = Job(id="j", inputs="x")
    constrained = Job(id="j", inputs="x", parameters=Parameters(
        grammar=Grammar(type="regex", value="a+")))
    assert plain.v == 1
    assert constrained.v == protocol.MUST_UNDERSTAND["grammar"] == 2
    assert Job(id="j", inputs="x", parameters=Parameters(logit_bias={5: -100.0})).v == 2
    assert json.loads(encode(constrained))["v"] == 2
    relabelled = json.loads(encode(constrained))
    relabelled["v"] = 1  # a producer that does not know the rule
    assert decode_job(json.dumps(relabelled)).v == 2
    assert max(protocol.MUST_UNDERSTAND.values()) <= protocol.PROTOCOL_VERSION
    assert set(protocol.MUST_UNDERSTAND) <= set(Parameters.__struct_fields__)


@pytest.mark.parametrize("job", [
    Job(id="ok", inputs=None),
    Job(id="ok", inputs="a", messages=[Message(role="user", content="b")]),
    Job(id="ok", inputs=""),
    Job(id="ok", messages=[]),
    Job(id="", inputs="a"),
    Job(id="has space", inputs="a"),
    Job(id="has{brace}", inputs="a"),
    Job(id="x" * 201, inputs="a"),
])
def test_malformed_jobs_are_rejected(job):
    with pytest.raises(ValidationError, match="Input validation error"):
        validate_job(job)


def test_error_types_map_to_typed_errors():
    assert error_class("validation") is ValidationError
    assert error_class("overloaded") is OverloadedError
    assert error_class("deadline_exceeded") is DeadlineExceededError
    assert error_class("generation") is GenerationError
    assert error_class("something_new") is GenerationError
    assert set(protocol.ERROR_TYPES) == {"validation", "overloaded", "generation",
                                         "incomplete_generation", "deadline_exceeded"}
    assert issubclass(ValidationError, ValueError)


def test_the_producer_imports_neither_torch_nor_the_engine():
    code = ("import sys, tokenfleet.producer, tokenfleet.producer.fleet_status; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tokenfleet.engine')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
