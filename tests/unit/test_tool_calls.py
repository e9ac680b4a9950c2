"""OpenAI function calling mapped onto grammars: what requests are refused, which answers the
grammar admits (checked by compiling it with the engine's own compiler), and how answers
become `tool_calls`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tokenfleet.engine.grammar import Grammar
from tokenfleet.engine.grammar_compiler import GrammarCompiler
from tokenfleet.engine.tokenizer import Tokenizer
from tokenfleet.producer import openai_api
from tokenfleet.producer.errors import ValidationError
from tokenfleet.producer.tool_calls import NO_TOOL, ToolCallPlan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([{"type": "retrieval"}], "auto", "every tool must be"),
    ([{"type": "function"}], "auto", "needs a `function`"),
    ([{"type": "function", "function": {"name": "has space"}}], "auto", "function name"),
    ([WEATHER, WEATHER], "auto", "unique"),
    ([{"type": "function", "function": {"name": NO_TOOL}}], "auto", "reserved"),
    ([WEATHER], "get_time", "not in `tools`"),
    ([WEATHER], {"type": "function"}, "`tool_choice` must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "auto",
     "JSON schema object"),
])
def test_bad_tool_requests_are_validation_errors(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ToolCallPlan.build(tools, choice)


def test_no_tools_or_choice_none_is_plain_chat() -> None:
    assert ToolCallPlan.build(None, "auto") is None
    assert ToolCallPlan.build([WEATHER], "none") is None


@pytest.fixture(scope="module")
def compiler(smollm2_dir: Path) -> tuple[GrammarCompiler, Tokenizer]:
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    return GrammarCompiler(tokenizer.to_json, 49152, tokenizer.eos_token_ids), tokenizer


def _admits(compiler: tuple[GrammarCompiler, Tokenizer], plan: ToolCallPlan, text: str) -> bool:
    grammars, tokenizer = compiler
    matcher = grammars.matcher(Grammar.coerce(plan.grammar()))  # type: ignore[arg-type]
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize(("choice", "text", "admitted"), [
    ("required", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', True),
    ("required", '{"name": "get_time", "arguments": {}}', True),
    ("required", '{"name": "get_weather", "arguments": {"town": "Oslo"}}', False),
    ("required", '{"name": "launch", "arguments": {}}', False),
    ("required", '{"name": "no_tool", "arguments": {"content": "hi"}}', False),
    ("auto", '{"name": "no_tool", "arguments": {"content": "hi"}}', True),
    ("auto", '{"name": "get_time", "arguments": {}}', True),
    ({"type": "function", "function": {"name": "get_time"}},
     '{"name": "get_time", "arguments": {}}', True),
    ({"type": "function", "function": {"name": "get_time"}},
     '{"name": "get_weather", "arguments": {"city": "Oslo"}}', False),
    ("get_weather", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', True),
])
def test_the_grammar_admits_exactly_the_allowed_calls(compiler: Any, choice: Any, text: str,
                                                      admitted: bool) -> None:
    plan = ToolCallPlan.build([WEATHER, CLOCK], choice)
    assert plan is not None
    assert _admits(compiler, plan, text) is admitted


def test_answers_become_tool_calls_or_content() -> None:
    plan = ToolCallPlan.build([WEATHER], "auto")
    assert plan is not None
    message, is_call = plan.message('{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                    "call_1")
    assert is_call and message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    message, is_call = plan.message('{"name": "no_tool", "arguments": {"content": "Hi!"}}', "c")
    assert not is_call and message == {"role": "assistant", "content": "Hi!"}
    cut = '{"name": "get_weather", "argu'  # max_tokens reached mid-call
    assert plan.message(cut, "c") == ({"role": "assistant", "content": cut}, False)


def test_chat_arguments_show_the_tools_and_replay_earlier_calls() -> None:
    req = msgspec.convert({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "12 C, rain", "tool_call_id": "c1"},
        {"role": "user", "content": "And in Rome?"}],
        "tools": [WEATHER], "tool_prompt": "Use a tool:"}, openai_api.ChatRequest)
    plan = ToolCallPlan.build(req.tools, req.tool_choice)
    args = openai_api.chat_job_arguments(req, 50, plan)
    messages = args["messages"]
    assert messages[2] == {"role": "assistant", "content": json.dumps(
        {"name": "get_weather", "arguments": {"city": "Oslo"}})}
    assert messages[3] == {"role": "tool", "content": "12 C, rain"}
    assert messages[1]["content"] == "Weather in Oslo?"  # only the last user turn grows
    assert messages[4]["content"].startswith("And in Rome?\n\nUse a tool:\n")
    assert json.loads(messages[4]["content"].split("\n", 3)[3]) == [WEATHER]
    assert plan is not None and args["grammar"] == plan.grammar()
    with pytest.raises(ValidationError, match="cannot be combined"):
        openai_api.chat_job_arguments(msgspec.convert({
            "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
            "response_format": {"type": "json_object"}}, openai_api.ChatRequest), 50, plan)


PYDANTIC_STYLE = {"type": "function", "function": {"name": "book", "parameters": {
    "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
              "Address": {"type": "object", "properties": {
                  "city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
                  "required": ["city", "unit"], "additionalProperties": False}},
    "type": "object", "properties": {"to": {"$ref": "#/$defs/Address"},
                                     "note": {"$ref": "#/$defs/Address/properties/city"}},
    "required": ["to"], "additionalProperties": False}}}
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"},
                                              "maxItems": 2}},
    "required": ["kids"], "additionalProperties": False}}}


@pytest.mark.parametrize(("text", "admitted"), [
    ('{"name": "book", "arguments": {"to": {"city": "Oslo", "unit": "celsius"}}}', True),
    ('{"name": "book", "arguments": {"to": {"city": "Oslo", "unit": "kelvin"}}}', False),
    ('{"name": "book", "arguments": {"to": {"city": "Oslo", "unit": "celsius"}, '
     '"note": "hi"}}', True),
    ('{"name": "book", "arguments": {"to": {"city": "Oslo", "unit": "celsius"}, '
     '"note": 5}}', False),
    ('{"name": "tree", "arguments": {"kids": [{"kids": []}, {"kids": [{"kids": []}]}]}}', True),
    ('{"name": "tree", "arguments": {"kids": [{"leaf": 1}]}}', False),
])
def test_tools_with_local_refs_keep_their_meaning(compiler: Any, text: str,
                                                 admitted: bool) -> None:
    """Pydantic-made schemas keep nested models and enums in `$defs` and point at them with
    `$ref`; inside the combined grammar those refs must still reach the tool's own defs
    (and `#` its own root, not the wrapper's)."""
    plan = ToolCallPlan.build([PYDANTIC_STYLE, TREE, CLOCK], "required")
    assert plan is not None
    assert _admits(compiler, plan, text) is admitted


def test_oversized_tools_are_refused_by_name() -> None:
    huge = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 80}
                                         for i in range(800)}}}}
    plan = ToolCallPlan.build([huge], "auto")
    assert plan is not None
    with pytest.raises(ValidationError, match="`tools`"):
        plan.grammar()


def test_finish_reason_is_tool_calls_unless_the_function_was_named() -> None:
    from tokenfleet.producer.api_renderers import ChatRenderer
    from tokenfleet.producer.protocol import FinalDetails, FinalEvent

    answer = '{"name": "get_time", "arguments": {}}'
    final = FinalEvent(id="r", generated_text=answer,
                       details=FinalDetails(finish_reason="eos_token", generated_tokens=9))
    reasons = {}
    for choice in ("required", "auto", "get_time"):
        plan = ToolCallPlan.build([WEATHER, CLOCK], choice)
        body = ChatRenderer(model="m", request_id="chatcmpl-r", tools=plan).body(final, [])
        message = body["choices"][0]["message"]
        assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
        reasons[choice] = body["choices"][0]["finish_reason"]
    assert reasons == {"required": "tool_calls", "auto": "tool_calls", "get_time": "stop"}


def test_an_assistant_turn_with_text_and_a_call_keeps_both() -> None:
    req = msgspec.convert({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]},
        openai_api.ChatRequest)
    args = openai_api.chat_job_arguments(req, 50)
    assert args["messages"][1]["content"] == 'Let me check.\n' + json.dumps(
        {"name": "get_weather", "arguments": {"city": "Oslo"}})


@pytest.mark.parametrize("piece_len", [1, 3, 7, 1000])
def test_a_call_streams_its_arguments_as_they_are_generated(piece_len: int) -> None:
    from tokenfleet.producer.tool_calls import ToolCallStream

    text = '{"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}'
    stream = ToolCallStream("call_x")
    entries = []
    for i in range(0, len(text), piece_len):
        entries += stream.push(text[i:i + piece_len])
    entries += stream.finish(complete=True)
    assert entries[0] == {"index": 0, "id": "call_x", "type": "function", "function": {
        "name": "get_weather", "arguments": entries[0]["function"]["arguments"]}}
    streamed = "".join(e["function"]["arguments"] for e in entries)
    assert streamed == '{"city": "Zürich", "days": [1, 2]}'
    plan = ToolCallPlan.build([WEATHER], "required")
    assert plan is not None
    message, _ = plan.message(text, "call_x")
    assert message["tool_calls"][0]["function"]["arguments"] == streamed  # same as whole
    if piece_len == 1:
        assert len(entries) > 10  # really piece by piece


def test_a_cut_call_streams_what_there_is_and_no_tool_waits() -> None:
    from tokenfleet.producer.tool_calls import ToolCallStream

    cut = ToolCallStream("c")
    entries = cut.push('{"name": "f", "arguments": {"a": {"b": 1}')
    entries += cut.finish(complete=False)  # max_tokens: no wrapper brace, nothing held
    assert "".join(e["function"]["arguments"] for e in entries) == '{"a": {"b": 1}'
    words = ToolCallStream("c")
    assert words.push('{"name": "no_tool", "arguments": {"content": "hi"}}') == []
    assert not words.started and words.finish(complete=True) == []


def test_each_choice_of_an_n_request_gets_its_own_call_id() -> None:
    from tokenfleet.producer.api_renderers import ChatRenderer
    from tokenfleet.producer.protocol import FinalDetails, FinalEvent

    plan = ToolCallPlan.build([CLOCK], "required")
    answer = '{"name": "get_time", "arguments": {}}'
    finals = [FinalEvent(id=f"r-{i}", generated_text=answer,
                         details=FinalDetails(finish_reason="eos_token", generated_tokens=9))
              for i in range(3)]
    renderer = ChatRenderer(model="m", request_id="chatcmpl-r", tools=plan)
    body = renderer.body_many(finals, [[], [], []])
    ids = [c["message"]["tool_calls"][0]["id"] for c in body["choices"]]
    assert len(set(ids)) == 3 and ids[0] == "call_r"
    streamed = [r._call_id(r.choice_index)  # type: ignore[attr-defined]
                for r in renderer.for_choices(3)]
    assert streamed == ids
