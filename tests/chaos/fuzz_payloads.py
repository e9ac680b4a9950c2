"""Hypothesis strategies for job payloads written straight into a queue stream: valid jobs,
jobs with fields replaced by wrong types and edge values, byte-mutated JSON, other JSON and
noise. Each draw is a `Payload`; `render(request_id)` gives the stream entry's fields."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

ID_SLOT = object()  # replaced by a unique request id when the payload is rendered

_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                   max_size=3),
    max_leaves=6,
)


def _edgy_floats(low: float, high: float) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.floats(low, high),
                     st.sampled_from([0.0, 1e-30, 1e-300, 1.0, 1e30, -1.0]), _ANY_JSON)


def _edgy_ints(low: int, high: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(low, high), st.sampled_from([0, -1, 2**31, 2**63, 2**64]),
                     _ANY_JSON)


# Grammars that compile (and stay small), then wild ones: bad regexes, schemas of any shape.
_GOOD_GRAMMARS = st.sampled_from([
    {"type": "regex", "value": "[a-z]{1,5}"},
    {"type": "regex", "value": r"(yes|no)\.( [A-Z][a-z]+)*"},
    {"type": "json", "value": {"type": "object", "properties": {"a": {"type": "integer"}},
                               "required": ["a"]}},
    {"type": "json", "value": '{"type": "array", "items": {"enum": ["x", "y"]}}'},
    {"type": "json_schema", "value": {"name": "n", "schema": {"type": "boolean"}}},
])
_GRAMMARS = st.one_of(
    st.none(), _GOOD_GRAMMARS,
    st.fixed_dictionaries({"type": st.sampled_from(["regex", "json", "json_schema", "lark"]),
                           "value": st.one_of(st.text(max_size=12), _ANY_JSON)}),
    _ANY_JSON)
_LOGIT_BIAS = st.one_of(  # keys must be hashable: ints (as msgspec writes them) or strings
    st.dictionaries(st.one_of(st.integers(-3, 60_000), st.sampled_from([2**31, 2**64]),
                              st.text(max_size=4)),
                    _edgy_floats(-150.0, 150.0), max_size=3),
    _ANY_JSON)

_PARAMETERS = st.fixed_dictionaries({}, optional={
    "grammar": _GRAMMARS,
    "logit_bias": _LOGIT_BIAS,
    "max_new_tokens": st.one_of(st.integers(1, 60), _edgy_ints(-3, 2000)),
    "min_new_tokens": _edgy_ints(-2, 40),
    "do_sample": st.one_of(st.booleans(), _ANY_JSON),
    "temperature": _edgy_floats(-1.0, 4.0),
    "top_k": st.one_of(st.none(), _edgy_ints(-2, 100_000)),
    "top_p": _edgy_floats(-0.5, 1.5),
    "typical_p": _edgy_floats(-0.5, 1.5),
    "min_p": _edgy_floats(-0.5, 1.5),
    "repetition_penalty": _edgy_floats(-1.0, 10.0),
    "frequency_penalty": _edgy_floats(-3.0, 3.0),
    "presence_penalty": _edgy_floats(-3.0, 3.0),
    "stop": st.one_of(st.lists(st.text(max_size=6), max_size=20), _ANY_JSON),
    "stop_token_ids": st.one_of(st.lists(_edgy_ints(-5, 60_000), max_size=4), _ANY_JSON),
    "seed": st.one_of(st.none(), _edgy_ints(-1, 2**64 + 1)),
    "truncate": st.one_of(st.none(), _edgy_ints(-1, 50)),
    "return_full_text": st.one_of(st.booleans(), _ANY_JSON),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "top_n_tokens": st.one_of(st.none(), _edgy_ints(-1, 10)),
    "ignore_eos": st.booleans(),
})

_MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "wizard"]), _ANY_JSON),
    "content": st.one_of(st.text(max_size=80), _ANY_JSON),
}), max_size=4)


def _job(now_ms: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"id": st.one_of(st.just(ID_SLOT), st.just(ID_SLOT), st.just(ID_SLOT),
                         st.sampled_from(["", "has space", "{brace}", "x" * 300]), _ANY_JSON)},
        optional={
            "v": st.one_of(st.integers(0, 3), _ANY_JSON),
            "model": st.one_of(st.sampled_from(["", "sim", "gpt-17"]), _ANY_JSON),
            "inputs": st.one_of(st.text(min_size=1, max_size=200), st.just(""), _ANY_JSON),
            "messages": st.one_of(_MESSAGES, _ANY_JSON),
            "parameters": st.one_of(_PARAMETERS, _PARAMETERS, _ANY_JSON),
            "priority": _edgy_ints(-5, 5),
            "deadline_ms": st.one_of(st.integers(now_ms - 10_000, now_ms + 60_000),
                                     _edgy_ints(-1, 10)),
            "tenant": st.one_of(st.text(max_size=10), _ANY_JSON),
            "submitted_ms": _edgy_ints(0, now_ms),
            "unknown_field": _ANY_JSON,
        })


_VALID_PARAMETERS = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 40)}, optional={
    "min_new_tokens": st.integers(0, 1),
    "do_sample": st.booleans(),
    "temperature": st.floats(0.05, 3.0),
    "top_k": st.integers(1, 100),
    "top_p": st.floats(0.05, 1.0),
    "typical_p": st.floats(0.05, 1.0),
    "min_p": st.floats(0.0, 0.5),
    "repetition_penalty": st.floats(0.5, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 30_000), max_size=3),
    "seed": st.integers(0, 2**64 - 1),
    "truncate": st.integers(1, 50),
    "return_full_text": st.booleans(),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "top_n_tokens": st.integers(0, 5),
    "ignore_eos": st.booleans(),
    "grammar": _GOOD_GRAMMARS,
    "logit_bias": st.dictionaries(st.integers(0, 30_000), st.floats(-100.0, 100.0),
                                  max_size=3),
})


def _valid_job(now_ms: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"id": st.just(ID_SLOT), "inputs": st.text(min_size=1, max_size=120).filter(str.strip),
         "parameters": _VALID_PARAMETERS},
        optional={"deadline_ms": st.integers(now_ms + 60_000, now_ms + 600_000),
                  "submitted_ms": st.integers(now_ms - 1000, now_ms),
                  "priority": st.integers(-5, 5), "tenant": st.text(max_size=8)})


def _one_field_wrong(now_ms: int) -> st.SearchStrategy[dict[str, Any]]:
    """A valid job with one top-level field or one parameter replaced by a wild value."""
    wild = st.one_of(_ANY_JSON, _edgy_ints(-5, 5000), _edgy_floats(-5.0, 5.0))
    names = st.sampled_from(["v", "model", "inputs", "messages", "deadline_ms",
                             *(f"parameters.{n}" for n in _VALID_PARAMETERS_NAMES)])
    return st.tuples(_valid_job(now_ms), names, wild).map(_replace_one)


_VALID_PARAMETERS_NAMES = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
                           "typical_p", "min_p", "repetition_penalty", "frequency_penalty",
                           "presence_penalty", "stop", "stop_token_ids", "seed", "truncate",
                           "top_n_tokens", "do_sample", "grammar", "logit_bias")


def _replace_one(args: tuple[dict[str, Any], str, Any]) -> dict[str, Any]:
    job, name, value = args
    job = {**job, "parameters": dict(job["parameters"])}
    if name.startswith("parameters."):
        job["parameters"][name.split(".", 1)[1]] = value
    else:
        job[name] = value
    return job


_MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete"]),
                      st.floats(0, 1), st.integers(0, 255))


@dataclass(frozen=True)
class Payload:
    kind: str  # "job", "mutated", "json", "noise"
    body: Any
    mutations: tuple[tuple[str, float, int], ...] = ()
    field: bytes = b"job"

    def render(self, request_id: str) -> dict[bytes, bytes]:
        if self.kind in ("job", "mutated"):
            job = {k: request_id if v is ID_SLOT else v for k, v in self.body.items()}
            data = json.dumps(job).encode()
        elif self.kind == "json":
            data = json.dumps(self.body).encode()
        else:
            data = self.body
        for op, where, byte in self.mutations:
            data = _mutate(data, op, where, byte)
        return {self.field: data}


def _mutate(data: bytes, op: str, where: float, byte: int) -> bytes:
    i = min(len(data), int(where * len(data)))
    if op == "truncate":
        return data[:i]
    if op == "flip" and i < len(data):
        return data[:i] + bytes([byte]) + data[i + 1:]
    if op == "insert":
        return data[:i] + bytes([byte]) + data[i:]
    return data[:i] + data[i + 4:]


def payloads() -> st.SearchStrategy[Payload]:
    """About a third valid jobs, a third with one wrong field, the rest wilder: arbitrary
    structures, byte-mutated JSON, other JSON, noise, a missing `job` field."""
    now_ms = int(time.time() * 1000)
    valid, wrong, wild = _valid_job(now_ms), _one_field_wrong(now_ms), _job(now_ms)
    mutations = st.lists(_MUTATION, min_size=1, max_size=3).map(tuple)
    return st.one_of(
        valid.map(lambda j: Payload("job", j)),
        valid.map(lambda j: Payload("job", j)),
        wrong.map(lambda j: Payload("job", j)),
        wrong.map(lambda j: Payload("job", j)),
        wild.map(lambda j: Payload("job", j)),
        st.builds(Payload, st.just("mutated"), valid, mutations),
        st.builds(Payload, st.just("json"), _ANY_JSON),
        st.builds(Payload, st.just("noise"), st.binary(max_size=120)),
        valid.map(lambda j: Payload("job", j, field=b"not_job")),
    )
