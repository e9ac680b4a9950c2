"""`tokenfleet bench` keeps working: its numbers are present and consistent (no performance
assertions: this machine is shared and slow)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfleet.engine.simulated_engine import SimulatedEngine, WhitespaceTokenizer
from tokenfleet.engine.tokenizer import Tokenizer
from tokenfleet.worker.bench import BenchRun, run_fleet, run_in_process
from tokenfleet.worker.bench_cli import prepare
from tokenfleet.worker.bench_report import format_table, summarize
from tokenfleet.worker.bench_workload import (
    LengthDistribution,
    PromptMaker,
    WorkloadError,
    arrival_times_s,
    build_workload,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATS = ("ttft", "tpot", "itl", "e2el")


def check_summary(summary: dict, num_requests: int, output_lens: list[int]) -> None:
    assert summary["completed"] == num_requests and summary["failed"] == 0, summary["errors"]
    assert summary["total_output_tokens"] == sum(output_lens)
    assert summary["duration_s"] > 0
    assert summary["output_throughput"] > 0 and summary["request_throughput"] > 0
    for name in STATS:
        p50, p90, p99 = (summary[f"p{p}_{name}_ms"] for p in (50, 90, 99))
        assert 0 <= p50 <= p90 <= p99, (name, p50, p90, p99)
        assert summary[f"median_{name}_ms"] == p50
    # TTFT < E2E for every request with more than one token, hence for the means
    assert summary["mean_ttft_ms"] < summary["mean_e2el_ms"]


def check_run(run: BenchRun) -> None:
    for r in run.results:
        assert r.num_tokens == r.output_len
        assert r.token_times_s == sorted(r.token_times_s)
        assert r.start_s <= r.token_times_s[0] <= r.end_s
        assert math.isclose(r.ttft_s + (r.num_tokens - 1) * r.tpot_s, r.e2e_s, abs_tol=1e-9)


def test_length_distributions_are_seeded_and_in_range():
    uniform = LengthDistribution("uniform", 100, 0.25)
    long_tail = LengthDistribution("sharegpt", 50)
    a = build_workload(200, uniform, long_tail, seed=3, request_rate=10.0)
    assert a == build_workload(200, uniform, long_tail, seed=3, request_rate=10.0)
    assert all(75 <= s.prompt_len <= 125 for s in a)
    outputs = sorted(s.output_len for s in a)
    assert outputs[0] >= 1 and outputs[-1] <= 400
    assert outputs[len(outputs) // 2] < 100 < outputs[-1]  # median ~50, a long tail
    arrivals = [s.arrival_s for s in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert 10 < arrivals[-1] < 30  # 199 gaps of mean 0.1 s
    assert arrival_times_s(3, math.inf, random.Random(0)) == [0.0, 0.0, 0.0]
    clipped = build_workload(20, LengthDistribution("fixed", 900),
                             LengthDistribution("fixed", 300), max_model_len=1024)
    assert all(s.prompt_len + s.output_len <= 1024 for s in clipped)
    with pytest.raises(WorkloadError):
        LengthDistribution("zipf", 10)


@pytest.mark.parametrize("which", ["simulated", "smollm2"])
def test_prompts_have_exactly_the_drawn_token_count(which, smollm2_dir):
    tokenizer = (WhitespaceTokenizer(32_000) if which == "simulated"
                 else Tokenizer.from_dir(smollm2_dir))
    maker = PromptMaker(tokenizer)
    rng = random.Random(0)
    for n in (1, 2, 17, 300):
        text, count = maker.make(n, rng)
        assert count == n == len(tokenizer.encode(text))
    assert maker.make(50, rng)[0] != maker.make(50, rng)[0]


async def test_fleet_run_with_simulated_worker(fleet):
    requests, _ = prepare(WhitespaceTokenizer(32_000), 4096, num_requests=10, input_len=12,
                          output_len=6, length_dist="uniform", seed=1)
    async with fleet.worker(max_num_seqs=4, sim_step_ms=2.0), fleet.client() as client:
        run = await run_fleet(client, requests, concurrency=3, timeout_s=30)
    summary = summarize(run)
    check_summary(summary, 10, [r.spec.output_len for r in requests])
    check_run(run)
    assert summary["total_input_tokens"] == sum(r.spec.prompt_len for r in requests)
    # every request gives a first-token and a final event-latency sample
    # one sample per token event (n - 1 of them: the final event carries the last token)
    # plus one per final event
    assert sum(len(r.event_latencies_ms) for r in run.results) == sum(
        r.spec.output_len for r in requests)
    assert 0 <= summary["p50_event_latency_ms"] <= summary["p99_event_latency_ms"] < 10_000
    assert "Successful requests:                     10" in format_table(summary)


def test_in_process_on_tiny_model(tiny_llama_dir):
    from tokenfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(str(tiny_llama_dir), dtype="float32", device="cpu",
                                  max_num_seqs=4, num_kv_blocks=64)
    requests, _ = prepare(engine.tokenizer, 1024, num_requests=6, input_len=20, output_len=5,
                          length_dist="sharegpt", seed=2)
    run = run_in_process(engine, requests, concurrency=4)
    summary = summarize(run)
    check_summary(summary, 6, [r.spec.output_len for r in requests])
    check_run(run)
    assert summary["total_input_tokens"] == sum(r.num_prompt_tokens for r in requests)
    assert "mean_event_latency_ms" not in summary  # only the fleet publishes events


def test_in_process_honours_arrivals_and_concurrency():
    engine = SimulatedEngine(step_time_s=0.002, max_num_seqs=8)
    requests, _ = prepare(engine.tokenizer, 4096, num_requests=8, input_len=4, output_len=3,
                          request_rate=200.0, seed=0)
    run = run_in_process(engine, requests, concurrency=2)
    check_run(run)
    starts = sorted(r.start_s - run.start_s for r in run.results)
    for start, req in zip(starts, sorted(requests, key=lambda q: q.spec.arrival_s), strict=True):
        assert start >= req.spec.arrival_s - 1e-3  # never sent early
    # at most two in flight at any instant
    events = sorted([(r.start_s, 1) for r in run.results] + [(r.end_s, -1) for r in run.results])
    in_flight = 0
    for _, delta in events:
        in_flight += delta
        assert in_flight <= 2


async def test_cli_with_embedded_fleet_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLEET_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenfleet.worker.bench_cli", "--engine", "simulated",
        "--sim-step-ms", "2", "--num-requests", "8", "--warmup-requests", "1",
        "--concurrency", "4", "--input-len", "10", "--output-len", "5", "--num-workers", "2",
        "--cache-dir", str(tmp_path), "--output-json", str(out), "--plot", str(tmp_path / "p.png"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    table = stdout.decode()
    for label in ("Successful requests:", "Benchmark duration (s):",
                  "Request throughput (req/s):", "Output token throughput (tok/s):",
                  "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):", "Mean TPOT (ms):",
                  "Median TPOT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):",
                  "P99 ITL (ms):"):
        assert label in table, label
    data = json.loads(out.read_text())
    assert data["completed"] == 8 and data["total_output_tokens"] == 40
    assert data["output_lens"] == [5] * 8 and data["input_lens"] == [10] * 8
    assert data["meta"]["num_workers"] == 2 and data["meta"]["engine"] == "simulated"
    assert "[fleet] 8/8 requests" in stderr.decode()
