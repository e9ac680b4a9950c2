"""The HTTP gateway against a real Valkey/Redis and real workers (simulated engine here; the
real model in test_gateway_real_engine.py), driven by TGI's own client where it applies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import text_generation
from text_generation.errors import OverloadedError, ValidationError
from text_generation.types import ChatComplete, ChatCompletionChunk

from tokenfleet.producer.client import Client
from tokenfleet.producer.gateway import GatewayConfig
from tokenfleet.producer.gateway_server import GatewayServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def running_gateway(client: Client, **config: Any) -> AsyncIterator[str]:
    server = GatewayServer(client, GatewayConfig(**config), port=0, drain_timeout_s=2.0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


@pytest.fixture
async def served(fleet) -> AsyncIterator[tuple[str, Client]]:
    """A simulated worker and a gateway in front of its queue: (base URL, the gateway's client)."""
    async with fleet.worker(sim_step_ms=5.0), fleet.client() as client, \
            running_gateway(client) as url:
        yield url, client


async def _sse(response: aiohttp.ClientResponse) -> list[str]:
    """The `data` payloads of a server-sent-event stream (comments skipped)."""
    out = []
    async for line in response.content:
        text = line.decode().rstrip("\n")
        if text.startswith("data:"):
            out.append(text[len("data:"):].strip())
    return out


async def test_tgi_client_generate_and_stream(served):
    url, _ = served
    tgi = text_generation.AsyncClient(url, timeout=30)
    whole = await tgi.generate("one two three", max_new_tokens=6, top_n_tokens=2,
                               decoder_input_details=True)
    streamed = [r async for r in tgi.generate_stream("one two three", max_new_tokens=6)]

    assert whole.details.generated_tokens == 6
    assert whole.details.finish_reason == "length"
    assert len(whole.details.tokens) == 6
    assert [len(t) for t in whole.details.top_tokens] == [2] * 6
    assert all(r.generated_text is None for r in streamed[:-1])
    assert streamed[-1].generated_text == whole.generated_text
    assert "".join(r.token.text for r in streamed) == whole.generated_text
    assert [r.token.id for r in streamed] == [t.id for t in whole.details.tokens]
    assert streamed[-1].details.generated_tokens == 6


async def test_generate_route_and_timing_headers(served):
    url, _ = served
    async with aiohttp.ClientSession() as http, http.post(f"{url}/generate", json={
            "inputs": "one two", "parameters": {"max_new_tokens": 3}}) as resp:
        assert resp.status == 200
        body = await resp.json()
        headers = resp.headers
    assert set(body) == {"generated_text"}  # no details unless asked, as in TGI
    assert len(body["generated_text"].split()) == 3
    assert headers["x-generated-tokens"] == "3"
    assert headers["x-prompt-tokens"] == "2"
    assert int(headers["x-total-time"]) >= int(headers["x-queue-time"])
    assert len(headers["x-request-id"]) == 32


@pytest.mark.parametrize("parameters, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"best_of": 2}, "you must use sampling when `best_of`"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set"),
    ({"best_of": 9, "do_sample": True}, "`best_of` must be > 0 and <= 8"),
    ({"best_of": 2, "do_sample": True, "temperature": 0}, "you must use sampling"),
    ({"best_of": True, "do_sample": True}, "`best_of` must be > 0"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"grammar": {"type": "yaml", "value": "a: 1"}}, "grammar"),
    ({"grammar": {"type": "regex"}}, "grammar"),
    ({"grammar": {"type": "json", "value": "{oops"}}, "grammar"),
    ({"temperature": "hot"}, "temperature"),
])
async def test_bad_parameters_are_422_validation_errors(served, parameters, message):
    url, _ = served
    async with aiohttp.ClientSession() as http:
        for path in ("/generate", "/generate_stream"):
            async with http.post(url + path, json={"inputs": "x", "parameters": parameters}
                                 ) as resp:
                assert resp.status == 422
                body = await resp.json()
            assert body["error_type"] == "validation"
            assert message in body["error"]


async def test_malformed_bodies_are_422(served):
    url, _ = served
    async with aiohttp.ClientSession() as http:
        for path in ("/generate", "/", "/v1/chat/completions", "/v1/completions"):
            for data in (b"{not json", b'{"parameters": {}}', b'{"inputs": 5}', b"[]",
                         b'{"inputs": "hi \xff", "prompt": "\xfe", "messages": []}'):
                async with http.post(url + path, data=data) as resp:
                    assert resp.status == 422, (path, data)
                    body = await resp.json()
                assert "validation" in (body["error_type"] if "error_type" in body
                                        else body["error"]["type"])


async def test_worker_side_rejection_keeps_its_status_on_a_stream(fleet):
    # The prompt passes the gateway's checks but not the worker's context length: the worker
    # rejects it at intake, before any token, so even the stream answers 422 as TGI would.
    async with fleet.worker(sim_max_model_len=16), fleet.client() as client, \
            running_gateway(client) as url:
        async with aiohttp.ClientSession() as http, http.post(f"{url}/generate_stream", json={
                "inputs": "a b c d e f g h i j", "parameters": {"max_new_tokens": 10}}) as resp:
            assert resp.status == 422
            assert (await resp.json())["error_type"] == "validation"
        tgi = text_generation.AsyncClient(url, timeout=30)
        with pytest.raises(ValidationError, match="max_new_tokens"):
            async for _ in tgi.generate_stream("a b c d e f g h i j", max_new_tokens=10):
                pass


async def test_full_queue_is_429_overloaded(fleet):
    # No worker: the first request waits in the queue, the second finds it full.
    async with fleet.client(max_queue_len=1) as client, running_gateway(client) as url:
        tgi = text_generation.AsyncClient(url, timeout=30)
        waiting = asyncio.create_task(tgi.generate("first", max_new_tokens=2))
        await asyncio.sleep(0.5)
        with pytest.raises(OverloadedError):
            await tgi.generate("second", max_new_tokens=2)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


async def _read_then_disconnect(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                                headers: dict[str, str] | None = None,
                                num_events: int = 1) -> str:
    """Read `num_events` events of a stream, then drop the connection; the request id."""
    async with http.post(f"{url}/generate_stream", headers=headers, json=body) as resp:
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data:")
            if seen == num_events:
                return resp.headers["x-request-id"]
    raise AssertionError("stream ended early")


async def test_disconnect_cancels_the_request_in_the_fleet(fleet):
    async with fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            running_gateway(client) as url:
        async with aiohttp.ClientSession() as http:
            request_id = await _read_then_disconnect(http, url, {
                "inputs": "long", "parameters": {"max_new_tokens": 2000}}, num_events=3)
        final = await client.result(request_id, timeout_s=10)
        metrics = await _metrics_once_they_show(url, "tokenfleet_gateway_abandoned_total 1.0")
    assert "tokenfleet_gateway_abandoned_total 1.0" in metrics
    # 499 when the disconnect cancelled the handler, 200 when a write found it first.
    assert re.search(r'tokenfleet_gateway_requests_total\{route="/generate_stream",'
                     r'status="(499|200)"\} 1.0', metrics)
    assert final.details.finish_reason == "cancelled"
    assert final.details.generated_tokens < 200  # stopped within a few steps, not at 2000


async def test_an_abandoned_request_of_n_answers_counts_each_cancelled_job(fleet):
    """OpenAI's n = 2 runs two jobs: a client that goes away cancels both, and the metric
    counts two, as a gateway drain counts the jobs it cancels."""
    async with fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            running_gateway(client) as url:
        async with aiohttp.ClientSession() as http, http.post(
                f"{url}/v1/chat/completions",
                json={"model": "sim", "messages": [{"role": "user", "content": "long"}],
                      "max_tokens": 2000, "n": 2, "stream": True}) as resp:
            assert resp.status == 200
            seen = 0
            async for line in resp.content:
                seen += line.startswith(b"data:")
                if seen == 4:
                    break
        metrics = await _metrics_once_they_show(url, "tokenfleet_gateway_abandoned_total 2.0")
    assert "tokenfleet_gateway_abandoned_total 2.0" in metrics


async def _metrics_once_they_show(url: str, line: str) -> str:
    """The gateway's /metrics text once it contains `line` (the handler of an abandoned
    request may still be finishing its stream), or after ~2 s."""
    metrics = ""
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
            if line in metrics:
                break
            await asyncio.sleep(0.05)
    return metrics


async def test_a_whole_response_abandoned_by_its_client_is_cancelled(fleet):
    async with fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            running_gateway(client) as url:
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            with pytest.raises(asyncio.TimeoutError):
                await http.post(f"{url}/generate", json={
                    "inputs": "x", "parameters": {"max_new_tokens": 2000}})
        await asyncio.sleep(0.5)
        pattern = client.keys.result("ID").replace("ID", "*")  # every request's result
        results = [json.loads(await client.redis.get(k)) for k in
                   await client.redis.keys(pattern)]
    assert [r["details"]["finish_reason"] for r in results] == ["cancelled"]
    assert results[0]["details"]["generated_tokens"] < 200


async def test_idempotency_key_survives_a_disconnect_and_reattaches(fleet):
    async with fleet.worker(sim_step_ms=5.0), fleet.client() as client, \
            running_gateway(client) as url, aiohttp.ClientSession() as http:
        key = {"Idempotency-Key": "order-42"}
        body = {"inputs": "long", "parameters": {"max_new_tokens": 40, "details": True}}
        request_id = await _read_then_disconnect(http, url, body, key)
        # The same POST again re-attaches: the whole stream, from the first token.
        async with http.post(f"{url}/generate_stream", headers=key, json=body) as resp:
            assert resp.headers["x-request-id"] == request_id
            events = [json.loads(d) for d in await _sse(resp)]
        # The same key on another request is another request, not the first's answer.
        async with http.post(f"{url}/generate", headers=key, json={
                "inputs": "other", "parameters": {"max_new_tokens": 3}}) as resp:
            assert resp.headers["x-request-id"] != request_id
            assert len((await resp.json())["generated_text"].split()) == 3
        # Once its result has expired, a retry can be neither answered nor run twice: 410.
        await client.redis.delete(client.keys.events(request_id),
                                  client.keys.result(request_id))
        async with http.post(f"{url}/generate", headers=key, json=body) as resp:
            assert resp.status == 410
            assert (await resp.json())["error_type"] == "expired"
    assert [e["index"] for e in events] == list(range(1, 41))
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["finish_reason"] == "length"  # not cancelled by the disconnect


async def test_delete_cancels_a_request(fleet):
    async with fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            running_gateway(client) as url, aiohttp.ClientSession() as http:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 2000}}
        async with http.post(f"{url}/generate_stream", json=body) as resp:
            await resp.content.readline()
            request_id = resp.headers["x-request-id"]
            async with http.delete(f"{url}/requests/{request_id}") as deleted:
                assert deleted.status == 202
            events = [json.loads(d) for d in await _sse(resp)]
        final = await client.result(request_id, timeout_s=10)
    assert final.details.finish_reason == "cancelled"
    # TGI has no "cancelled": to its clients the stream ends with a generation error.
    assert events[-1]["error_type"] == "generation" and "cancelled" in events[-1]["error"]


async def test_gateway_timeout_is_504_and_cancels(fleet):
    async with fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            running_gateway(client, timeout_s=0.5) as url:
        async with aiohttp.ClientSession() as http, http.post(f"{url}/generate", json={
                "inputs": "x", "parameters": {"max_new_tokens": 2000}}) as resp:
            assert resp.status == 504
            # The gateway gives up, or the worker stops it at its deadline: a race, both 504.
            assert (await resp.json())["error_type"] in ("timeout", "deadline_exceeded")
            request_id = resp.headers["x-request-id"]
        # The abandoned job stops (cancelled, or past its deadline), far short of 2000 tokens.
        raw = None
        for _ in range(50):
            raw = await client.redis.get(client.keys.result(request_id))
            if raw is not None:
                break
            await asyncio.sleep(0.1)
        assert raw is not None, "the abandoned request kept running"
        result = json.loads(raw)
        assert (result["kind"] == "error" and result["error_type"] == "deadline_exceeded") \
            or result["details"]["finish_reason"] == "cancelled"


async def test_openai_chat_whole_and_streamed(served):
    url, _ = served
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            whole = await resp.json()
        async with http.post(f"{url}/v1/chat/completions", json={
                **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            chunks = await _sse(resp)
    ChatComplete(**whole)  # TGI's client types parse it
    assert whole["object"] == "chat.completion" and whole["model"] == "sim"
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 5
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 5
    assert [len(t["top_logprobs"]) for t in choice["logprobs"]["content"]] == [2] * 5
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    deltas = [p for p in parsed if p["choices"]]
    for p in deltas:
        ChatCompletionChunk(**p)
    assert "".join(p["choices"][0]["delta"]["content"] for p in deltas) == \
        choice["message"]["content"]
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    assert parsed[-1]["usage"] == whole["usage"]  # include_usage: a last chunk, no choices


async def test_openai_completions_and_refusals(served):
    url, _ = served
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/completions", json={
                "model": "sim", "prompt": "one two", "max_tokens": 4, "temperature": 0,
                "echo": True, "logprobs": 1}) as resp:
            assert resp.status == 200
            out = await resp.json()
        text = out["choices"][0]["text"]
        assert text.startswith("one two")  # echo: prompt + completion, verbatim
        assert len(text[len("one two"):].split()) == 4
        logprobs = out["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == 4
        assert logprobs["text_offset"][0] == len("one two")
        for bad in ({"n": 9}, {"n": 0}, {"tools": [{"type": "function"}]},
                    {"logit_bias": {"one": 5}}, {"logit_bias": {"1": 500}},
                    {"logit_bias": {"1": 10**400}}, {"logit_bias": {"1": True}},
                    {"response_format": {"type": "xml"}}, {"max_tokens": 0},
                    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                    {"temperature": -1}, {"top_p": 1.5},
                    {"messages": [{"role": "user", "content": [{"type": "text",
                                                                "text": None}]}]},
                    {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
            async with http.post(f"{url}/v1/chat/completions", json={
                    "model": "sim", "messages": [{"role": "user", "content": "x"}],
                    **bad}) as resp:
                assert resp.status == 422, bad
                error = (await resp.json())["error"]
            assert error["type"] == "validation"


async def test_health_info_models_and_api_key(fleet):
    async with fleet.worker(), fleet.client() as client, \
            running_gateway(client, api_key="s3cret") as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/models",
                            headers={"Authorization": "Bearer \u00ff\u00fe"}) as resp:
            assert resp.status == 401  # not a 500 on a header that is not ASCII
            assert resp.headers["Content-Type"].startswith("application/json")
        async with http.get(f"{url}/health") as resp:  # probes need no key
            assert resp.status == 200
            assert (await resp.json())["num_workers"] == 1
        async with http.post(f"{url}/generate", json={"inputs": "x"}) as resp:
            assert resp.status == 401
        async with http.get(f"{url}/v1/models",
                            headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": "Bearer s3cret"}
        async with http.get(f"{url}/v1/models", headers=auth) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["sim"]
        async with http.get(f"{url}/info", headers=auth) as resp:
            info = await resp.json()
        assert info["model_id"] == "sim" and info["num_workers"] == 1
        async with http.post(f"{url}/generate", headers=auth, json={
                "inputs": "x", "parameters": {"max_new_tokens": 2}}) as resp:
            assert resp.status == 200


async def test_unreachable_redis_is_503_not_a_crash():
    client = Client("redis://127.0.0.1:1/0", pool_timeout_s=1)
    async with client, running_gateway(client) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 503
        async with http.post(f"{url}/generate", json={"inputs": "x"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error_type"] == "unavailable"


async def test_gateway_process_serves_and_drains_on_sigterm(fleet):
    """`tokenfleet gateway` as a real process: it answers, and on SIGTERM it lets a stream
    in flight finish before it exits 0."""
    async with fleet.gateway("--drain-timeout-s", "20") as (proc, url), \
            fleet.worker(sim_step_ms=20.0), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/generate", json={
                "inputs": "x", "parameters": {"max_new_tokens": 3}}) as resp:
            assert resp.status == 200
        async with http.post(f"{url}/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": 40}}) as resp:
            await resp.content.readline()
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(d) for d in await _sse(resp)]
        assert len(events) == 39 and events[-1]["generated_text"] is not None
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_tgi_client_chat(served):
    """TGI's own client sends `null` for every unset field, `logprobs` and `stream` too."""
    url, _ = served
    tgi = text_generation.AsyncClient(url, timeout=30)
    reply = await tgi.chat(messages=[text_generation.types.Message(role="user", content="hi")],
                           max_tokens=4, temperature=0.0001, seed=3)
    assert reply.choices[0].finish_reason == "length"
    assert len(reply.choices[0].message.content.split()) == 4


async def test_sigterm_cancels_what_the_drain_time_leaves(fleet):
    """Past the drain time, a gateway stopping cancels the requests it still serves: their
    streams end with the cancel, and no worker keeps generating for nobody."""
    async with fleet.gateway("--drain-timeout-s", "0.5") as (proc, url), \
            fleet.worker(sim_step_ms=20.0), fleet.client() as client, \
            aiohttp.ClientSession() as http:
        async with http.post(f"{url}/generate_stream", json={
                "inputs": "x", "parameters": {"max_new_tokens": 2000}}) as resp:
            await resp.content.readline()
            request_id = resp.headers["x-request-id"]
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(d) for d in await _sse(resp)]
        final = await client.result(request_id, timeout_s=10)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert final.details.finish_reason == "cancelled"
    assert final.details.generated_tokens < 500
    assert "cancelled" in events[-1]["error"]


async def test_a_stalled_redis_is_a_prompt_503(server_process):
    """SIGSTOPped Redis: a submit fails with 503 after the client's socket timeout instead of
    hanging; once Redis resumes the gateway serves again."""
    client = Client(server_process.url, socket_timeout_s=1.0, pool_timeout_s=1.0)
    async with client, running_gateway(client) as url, aiohttp.ClientSession() as http:
        server_process.signal(signal.SIGSTOP)
        try:
            start = asyncio.get_running_loop().time()
            async with http.post(f"{url}/generate", json={"inputs": "x"}) as resp:
                assert resp.status == 503
            assert asyncio.get_running_loop().time() - start < 10
        finally:
            server_process.signal(signal.SIGCONT)
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 200


async def test_x_priority_header_picks_the_lane(fleet, redis, keys):
    # No worker: the jobs stay in their lanes for the test to look at.
    async with fleet.client() as client, running_gateway(client) as url, \
            aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(http.post(f"{url}/generate", headers=headers, json={
                     "inputs": "x", "parameters": {"max_new_tokens": 2}}))
                 for headers in ({"X-Priority": "3"}, {"X-Priority": "-1"}, {})]
        for _ in range(100):
            if sum([await redis.xlen(keys.jobs("default", lane))
                    for lane in ("high", "normal", "low")]) == 3:
                break
            await asyncio.sleep(0.05)
        assert [await redis.xlen(keys.jobs("default", lane))
                for lane in ("high", "normal", "low")] == [1, 1, 1]
        async with http.post(f"{url}/generate", headers={"X-Priority": "urgent"},
                             json={"inputs": "x"}) as resp:
            assert resp.status == 422
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_streamed_tool_call_keeps_the_connection_alive(served, monkeypatch):
    """A tool call is held back until it is complete; meanwhile the stream is not silent
    (idle proxies would cut it): keep-alive comments go out every KEEPALIVE_S."""
    from tokenfleet.producer import sse_stream

    monkeypatch.setattr(sse_stream, "KEEPALIVE_S", 0.02)
    url, _ = served
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/chat/completions", json={
            "model": "sim", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": 30, "tools": [tool], "tool_choice": "required",
            "logprobs": True}) as resp:
        assert resp.status == 200
        lines = [line.decode().strip() async for line in resp.content if line.strip()]
    assert lines.count(": keep-alive") >= 3, lines
    chunks = [json.loads(line[len("data: "):]) for line in lines
              if line.startswith("data: {")]
    assert len(chunks) == 1  # the whole answer at the end
    choice = chunks[0]["choices"][0]
    # the simulated engine's words are no JSON: content, finish_reason length
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["content"]) == 30  # every token's logprob, not the last's
    assert lines[-1] == "data: [DONE]"


async def test_best_of_returns_the_likeliest_answer_and_the_others(served):
    """TGI's best_of: n sampled answers, the one with the highest mean token logprob comes
    back, the others in details.best_of_sequences (TGI's client parses them)."""
    url, _ = served
    tgi = text_generation.AsyncClient(url, timeout=30)
    out = await tgi.generate("one two three", max_new_tokens=5, best_of=3, do_sample=True)
    others = out.details.best_of_sequences
    assert others is not None and len(others) == 2
    answers = [out.details, *others]

    def mean(d) -> float:
        return sum(t.logprob for t in d.tokens) / len(d.tokens)

    assert mean(out.details) == max(mean(d) for d in answers)
    assert len({tuple(t.id for t in d.tokens) for d in answers}) == 3  # three draws
    assert all(o.generated_text and o.generated_tokens == 5 for o in others)
    async with aiohttp.ClientSession() as http, http.post(url + "/generate_stream", json={
            "inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}) as resp:
        assert resp.status == 422
        assert "not supported when streaming" in (await resp.json())["error"]


async def test_openai_n_returns_n_choices(served):
    """n answers, each its own job; a seeded request's copies draw seed, seed + 1, ...: its
    second choice is what the same request with seed + 1 answers alone."""
    url, _ = served
    body = {"model": "sim", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "temperature": 0.8, "seed": 40}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json={**body, "n": 3}) as resp:
            assert resp.status == 200, await resp.text()
            many = await resp.json()
        async with http.post(f"{url}/v1/chat/completions", json={**body, "seed": 41}) as resp:
            single = await resp.json()
        async with http.post(f"{url}/v1/completions", json={
                "model": "sim", "prompt": "hello", "max_tokens": 3, "n": 2}) as resp:
            completions = await resp.json()
    choices = many["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[1]["message"] == single["choices"][0]["message"]
    assert len({c["message"]["content"] for c in choices}) == 3
    assert many["usage"]["completion_tokens"] == 12
    assert many["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert [c["index"] for c in completions["choices"]] == [0, 1]
    assert completions["usage"]["completion_tokens"] == 6


async def test_openai_n_streams_interleaved_choices(served):
    """Streamed with n: each choice's chunks carry its index, each choice ends with its own
    finish_reason, the usage comes once after all of them, then [DONE]; every choice's text
    is what the same request answers whole."""
    url, _ = served
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0.7, "seed": 3, "n": 3}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/chat/completions", json={
                **body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            assert resp.status == 200
            payloads = await _sse(resp)
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            whole = await resp.json()
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts = {i: "" for i in range(3)}
    ended = []
    for chunk in chunks[:-1]:
        choice, = chunk["choices"]
        texts[choice["index"]] += choice["delta"]["content"] or ""
        if choice["finish_reason"]:
            ended.append(choice["index"])
    assert sorted(ended) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 15
    assert all(c["usage"] is None for c in chunks[:-1])
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}


async def test_cancel_stops_every_copy_of_an_n_request(served):
    """DELETE /requests/{id} reaches the copies <id>-1, <id>-2 of an n = 3 request too: all
    three answers end early (OpenAI renders a cancelled answer as "stop")."""
    import hashlib

    url, _ = served
    body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "x"}],
                       "max_tokens": 400, "n": 3, "temperature": 0.5}).encode()
    request_id = "idem-" + hashlib.sha256(b"k1\n" + body).hexdigest()[:40]
    async with aiohttp.ClientSession() as http:
        answer = asyncio.create_task(http.post(
            f"{url}/v1/chat/completions", data=body,
            headers={"Idempotency-Key": "k1", "Content-Type": "application/json"}))
        await asyncio.sleep(0.3)  # ~60 of the 400 tokens each
        async with http.delete(f"{url}/requests/{request_id}") as resp:
            assert resp.status == 202
        async with await asyncio.wait_for(answer, 10) as resp:
            assert resp.status == 200
            out = await resp.json()
    assert [c["finish_reason"] for c in out["choices"]] == ["stop"] * 3
    assert out["usage"]["completion_tokens"] < 3 * 400


async def test_tgi_routes_take_logit_bias(served):
    url, _ = served
    async with aiohttp.ClientSession() as http, http.post(url + "/generate", json={
            "inputs": "x", "parameters": {"max_new_tokens": 3, "logit_bias": {"5": -100}}}
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_the_best_of_and_n_limit_is_a_setting(fleet):
    """gateway_max_best_of (TGI's --max-best-of) bounds both TGI's best_of and OpenAI's n,
    and /info reports it."""
    async with fleet.worker(sim_step_ms=5.0), fleet.client() as client, \
            running_gateway(client, max_best_of=2) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/info") as resp:
            assert (await resp.json())["max_best_of"] == 2
        tgi = {"inputs": "x", "parameters": {"do_sample": True, "max_new_tokens": 2}}
        async with http.post(f"{url}/generate", json={
                **tgi, "parameters": {**tgi["parameters"], "best_of": 3}}) as resp:
            assert resp.status == 422
            assert "`best_of` must be > 0 and <= 2" in (await resp.json())["error"]
        async with http.post(f"{url}/generate", json={
                **tgi, "parameters": {**tgi["parameters"], "best_of": 2}}) as resp:
            assert resp.status == 200
        chat = {"model": "sim", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2}
        async with http.post(f"{url}/v1/chat/completions", json={**chat, "n": 3}) as resp:
            assert resp.status == 422
            assert "<= 2" in (await resp.json())["error"]["message"]
        async with http.post(f"{url}/v1/chat/completions", json={**chat, "n": 2}) as resp:
            assert resp.status == 200
            assert len((await resp.json())["choices"]) == 2
