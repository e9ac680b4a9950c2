"""The `tokenfleet` command, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import SimulatedEngine

CLI = [sys.executable, "-m", "tokenfleet.worker.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLEET_")}


async def _run(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_demo_streams_an_answer_and_exits_cleanly(tmp_path):
    code, out, err = await _run("demo", "--engine", "simulated", "--sim-step-ms", "2",
                                "--max-new-tokens", "12", "--cache-dir", str(tmp_path))
    assert code == 0, err
    assert out.startswith("> What is the capital of France?\n")
    assert len(out.splitlines()[1].split()) == 12
    assert "12 tokens, length" in err


async def test_generate_through_the_fleet_and_status(fleet, keys, redis_url):
    async with fleet.worker(worker_id="cli-worker"):
        common = ["--redis-url", redis_url, "--key-prefix", keys.prefix]
        code, out, err = await _run("generate", "hello fleet", "--stream",
                                    "--max-new-tokens", "6", *common)
        assert code == 0, err
        assert len(out.split()) == 6
        code, out, err = await _run("generate", "hello fleet", "--chat",
                                    "--max-new-tokens", "3", *common)
        assert code == 0, err
        assert len(out.split()) == 3
        code, out, err = await _run("generate", "x", "--max-new-tokens", "0", *common)
        assert code == 1 and "error (validation)" in err
        code, out, err = await _run("status", "--json", *common)
        assert code == 0, err
        status = json.loads(out)
        assert [w["worker_id"] for w in status["workers"]] == ["cli-worker"]
        assert status["queues"][0]["queue"] == "default"


async def test_generate_local_runs_the_engine_in_process():
    code, out, err = await _run("generate", "local prompt", "--local", "--engine", "simulated",
                                "--sim-step-ms", "0", "--max-new-tokens", "4", "--stream")
    assert code == 0, err
    engine = SimulatedEngine(step_time_s=0)
    engine.add_request("r", engine.tokenizer.encode("local prompt"),
                       SamplingParams(max_new_tokens=4))
    expected = ""
    while engine.has_unfinished():
        expected += "".join(o.generated_text for o in engine.step() if o.finished)
    assert out == expected + "\n"


async def test_client_commands_do_not_import_torch(redis_url, keys):
    code = ("import sys; from tokenfleet.worker.cli import main; "
            f"rc = main(['status', '--json', '--redis-url', '{redis_url}', "
            f"'--key-prefix', '{keys.prefix}']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=_env(),
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_help_documents_env_vars_and_defaults():
    code, out, _err = await _run("worker", "--help")
    assert code == 0
    assert "TOKENFLEET_MAX_NUM_SEQS" in out and "default 32" in out
    assert "TOKENFLEET_REDIS_URL" in out
    code, out, _err = await _run("settings", "--markdown")
    assert code == 0 and out.count("| `TOKENFLEET_") >= 20


async def test_generate_local_with_a_regex_or_json_schema(smollm2_dir, tmp_path):
    common = ["--local", "--model", str(smollm2_dir), "--dtype", "float32"]
    code, out, err = await _run("generate", "Three digits:", "--regex", r"\d{3}",
                                "--max-new-tokens", "8", *common)
    assert code == 0, err
    assert out.strip().isdigit() and len(out.strip()) == 3
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "capital": {"type": "string"}}, "required": ["capital"], "additionalProperties": False}))
    code, out, err = await _run("generate", "What is the capital of France?", "--chat",
                                "--json-schema", f"@{schema}", "--max-new-tokens", "30", *common)
    assert code == 0, err
    assert json.loads(out) == {"capital": "Paris"}
    code, out, err = await _run("generate", "x", "--regex", "[a-", *common)
    assert code == 1 and "regex" in err
