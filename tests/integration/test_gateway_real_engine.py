"""The HTTP gateway in front of a real SmolLM2 worker: TGI's client and an OpenAI-style chat
get exactly what the engine generates offline (greedy, float32)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import text_generation

from tokenfleet.engine.llm import LLM
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.tokenizer import Tokenizer
from tokenfleet.producer.client import Client
from tokenfleet.producer.gateway import GatewayConfig
from tokenfleet.producer.gateway_server import GatewayServer

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
PROMPT = "The three primary colours are"


async def test_gateway_answers_what_the_engine_generates_offline(fleet, smollm2_dir: Path):
    llm = LLM(str(smollm2_dir), dtype="float32")
    chat_expected, = llm.generate([QUESTION], SamplingParams(max_new_tokens=12), chat=True)
    raw_expected, = llm.generate([PROMPT], SamplingParams(max_new_tokens=12))
    del llm

    async with _served(fleet, smollm2_dir) as (_client, url):
        tgi = text_generation.AsyncClient(url, timeout=120)
        whole, streamed, chat = await asyncio.wait_for(asyncio.gather(
            tgi.generate(PROMPT, max_new_tokens=12),
            _collect(tgi.generate_stream(PROMPT, max_new_tokens=12)),
            _chat(url, QUESTION),
        ), 300)

    assert whole.generated_text == raw_expected.text
    assert [t.id for t in whole.details.tokens] == raw_expected.token_ids
    assert whole.details.finish_reason == raw_expected.finish_reason
    assert "".join(r.token.text for r in streamed) == raw_expected.text
    assert streamed[-1].generated_text == raw_expected.text
    assert chat["choices"][0]["message"]["content"] == chat_expected.text
    assert "Paris" in chat["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] == len(chat_expected.token_ids)


@contextlib.asynccontextmanager
async def _served(fleet, smollm2_dir: Path) -> AsyncIterator[tuple[Client, str]]:
    """A float32 SmolLM2 worker and a gateway in front of it: (the gateway's client, URL)."""
    async with fleet.worker(engine="llm", model=str(smollm2_dir), dtype="float32",
                            max_num_seqs=4), fleet.client() as client:
        server = GatewayServer(client, GatewayConfig(), port=0)
        await server.start()
        try:
            yield client, f"http://127.0.0.1:{server.port}"
        finally:
            await server.stop()


async def _collect(stream) -> list:
    return [r async for r in stream]


async def _chat(url: str, question: str, max_tokens: int = 12, **extra: object) -> dict:
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": question}],
                  "max_tokens": max_tokens, "temperature": 0, **extra}) as resp:
        assert resp.status == 200, await resp.text()
        return json.loads(await resp.read())


CITY_SCHEMA = {"type": "object", "properties": {"capital": {"type": "string"}},
               "required": ["capital"], "additionalProperties": False}


async def test_grammar_through_the_fleet_tgi_and_openai(fleet, smollm2_dir: Path):
    """A grammar reaches the worker from the Python client, TGI's client and OpenAI's
    response_format; a regex that does not compile is the worker's 422, and the worker
    goes on serving."""
    from text_generation.errors import ValidationError as TGIValidationError
    from text_generation.types import Grammar, GrammarType

    async with _served(fleet, smollm2_dir) as (client, url):
        tgi = text_generation.AsyncClient(url, timeout=120)
        tokenizer = Tokenizer.from_dir(smollm2_dir)
        paris = {t for w in ("Paris", " Paris") for t in tokenizer.encode(
            w, add_special_tokens=False)}
        direct, via_tgi, via_openai, biased = await asyncio.wait_for(asyncio.gather(
            client.generate(messages=[{"role": "user", "content": QUESTION}],
                            max_new_tokens=30,
                            grammar={"type": "json", "value": CITY_SCHEMA}),
            tgi.generate("Three digits: ", max_new_tokens=10,
                         grammar=Grammar(type=GrammarType.Regex, value=r"\d{3}")),
            _chat(url, QUESTION, max_tokens=30, response_format={
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": CITY_SCHEMA}}),
            _chat(url, QUESTION, max_tokens=12,
                  logit_bias={str(t): -100 for t in paris}),
        ), 300)
        with pytest.raises(TGIValidationError, match="regex"):
            await tgi.generate("x", max_new_tokens=5,
                               grammar=Grammar(type=GrammarType.Regex, value="[a-"))
        after = await tgi.generate(PROMPT, max_new_tokens=3)

    assert json.loads(direct.generated_text) == {"capital": "Paris"}
    assert direct.details.finish_reason == "eos_token"
    assert len(via_tgi.generated_text) == 3 and via_tgi.generated_text.isdigit()
    content = via_openai["choices"][0]["message"]["content"]
    assert json.loads(content) == {"capital": "Paris"}
    assert via_openai["choices"][0]["finish_reason"] == "stop"
    assert after.details.generated_tokens == 3
    # logit_bias reaches the worker: the unbiased answer names Paris, this one cannot
    assert "Paris" not in biased["choices"][0]["message"]["content"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ALARM_TOOL = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["hour"]}}}


async def test_tool_calls_whole_and_streamed(fleet, smollm2_dir: Path):
    """OpenAI function calling: the answer is a `tool_calls` entry naming a given tool with
    arguments that fit its schema, whole or streamed, through TGI's client too."""
    question = "What is the weather like in Paris today?"
    async with _served(fleet, smollm2_dir) as (_client, url):
        tools = [WEATHER_TOOL, ALARM_TOOL]
        whole, streamed, named = await asyncio.wait_for(asyncio.gather(
            _chat(url, question, max_tokens=60, tools=tools, tool_choice="required"),
            _chat_stream(url, question, max_tokens=60, tools=tools,
                         tool_choice="required"),
            text_generation.AsyncClient(url, timeout=120).chat(
                [{"role": "user", "content": question}], max_tokens=60,
                tools=tools, tool_choice="set_alarm"),
        ), 300)

    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call, = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] in ("get_weather", "set_alarm")
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city", "unit"}
        assert arguments["unit"] in ("celsius", "fahrenheit")
    # streamed as OpenAI does: no content, a first tool_calls delta with the id and name,
    # then the arguments in pieces that add up to the whole response's arguments
    deltas = [c["choices"][0] for c in streamed if c["choices"]]
    assert all(not d["delta"].get("content") for d in deltas)
    entries = [e for d in deltas for e in d["delta"]["tool_calls"] or []]
    assert len(entries) > 3 and all(e["index"] == 0 for e in entries)
    assert entries[0]["id"].startswith("call_") and entries[0]["type"] == "function"
    assert entries[0]["function"]["name"] == call["function"]["name"]
    assert "".join(e["function"]["arguments"] for e in entries) == \
        call["function"]["arguments"]
    assert deltas[-1]["finish_reason"] == "tool_calls"
    alarm, = named.choices[0].message.tool_calls
    assert alarm["function"]["name"] == "set_alarm"
    assert 0 <= json.loads(alarm["function"]["arguments"])["hour"] <= 23


async def _chat_stream(url: str, question: str, max_tokens: int, **extra: object) -> list:
    chunks = []
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": question}],
                  "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    ) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks
