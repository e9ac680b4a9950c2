"""Worker settings: defaults, TOKENFLEET_* variables, command-line precedence, validation —
and the rule that no other module of the package reads the environment."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from tokenfleet.worker.settings import SettingsError, WorkerSettings, env_var

REPO = Path(__file__).resolve().parents[2]


def test_defaults():
    s = WorkerSettings()
    assert (s.engine, s.model, s.queue, s.key_prefix) == ("llm", "smollm2", "default", "tf")
    assert s.redis_url is None  # = embedded Valkey
    assert (s.lease_ms, s.max_deliveries, s.metrics_port) == (30_000, 3, 0)
    assert s.heartbeat_s == pytest.approx(10.0)
    assert s.resolved_cache_dir.name == "tokenfleet"


def test_environment_is_parsed_per_type():
    env = {"TOKENFLEET_MAX_NUM_SEQS": "64", "TOKENFLEET_DRAIN_TIMEOUT_S": "2.5",
           "TOKENFLEET_REDIS_URL": "redis://r:6379/1", "TOKENFLEET_CACHE_DIR": "/tmp/tfc",
           "TOKENFLEET_KV_CACHE_BYTES": "1000000", "TOKENFLEET_ENGINE": "simulated",
           "TOKENFLEET_QUEUE": "", "UNRELATED": "x"}
    s = WorkerSettings.from_env(env)
    assert s.max_num_seqs == 64 and s.drain_timeout_s == 2.5
    assert s.redis_url == "redis://r:6379/1" and s.cache_dir == Path("/tmp/tfc")
    assert s.kv_cache_bytes == 1_000_000 and s.engine == "simulated"
    assert s.queue == "default"  # an empty variable counts as unset


def test_command_line_beats_environment_beats_default():
    parser = argparse.ArgumentParser()
    WorkerSettings.add_arguments(parser)
    env = {"TOKENFLEET_MAX_NUM_SEQS": "64", "TOKENFLEET_QUEUE": "from-env"}
    s = WorkerSettings.from_args(parser.parse_args(["--max-num-seqs", "8"]), env)
    assert (s.max_num_seqs, s.queue, s.block_size) == (8, "from-env", 16)


@pytest.mark.parametrize(("env", "message"), [
    ({"TOKENFLEET_MAX_NUM_SEQS": "many"}, "TOKENFLEET_MAX_NUM_SEQS"),
    ({"TOKENFLEET_MAX_NUM_SEQS": "0"}, "must be > 0"),
    ({"TOKENFLEET_ENGINE": "magic"}, "must be one of"),
    ({"TOKENFLEET_LOG_FORMAT": "xml"}, "TOKENFLEET_LOG_FORMAT"),
    ({"TOKENFLEET_METRICS_PORT": "70000"}, "port"),
    ({"TOKENFLEET_DRAIN_TIMEOUT_S": "-1"}, ">= 0"),
    ({"TOKENFLEET_GATEWAY_PORT": "-1"}, "port"),
    ({"TOKENFLEET_GATEWAY_API_KEY": "  "}, "TOKENFLEET_GATEWAY_API_KEY.*empty"),
    ({"TOKENFLEET_GATEWAY_TIMEOUT_S": "0"}, "TOKENFLEET_GATEWAY_TIMEOUT_S"),
    ({"TOKENFLEET_OWNER_TTL_S": "0.2"}, "TOKENFLEET_OWNER_TTL_S.*at least 1 s"),
])
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(SettingsError, match=message):
        WorkerSettings.from_env(env)


def test_help_and_env_reference_cover_every_setting():
    parser = argparse.ArgumentParser()
    WorkerSettings.add_arguments(parser)
    help_text = parser.format_help()
    table = WorkerSettings.markdown_table()
    for f in dataclasses.fields(WorkerSettings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_var(f.name) in help_text
        assert f"`{env_var(f.name)}`" in table
        assert f.metadata["help"]


def test_settings_is_the_only_module_that_reads_the_environment():
    """No other module reads the environment; kernels/ may read Triton's own variables
    (TRITON_INTERPRET), which are the compiler's settings, not ours."""
    offenders = []
    for folder in ("producer", "worker", "engine", "kernels"):
        for path in (REPO / folder).rglob("*.py"):
            if path == REPO / "worker" / "settings.py":
                continue
            if folder == "kernels":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute):
                    name, line = node.attr, node.lineno
                elif isinstance(node, ast.Name):
                    name, line = node.id, node.lineno
                else:
                    continue
                if name in {"environ", "getenv", "environb", "putenv"}:
                    offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, offenders


def test_deploy_env_reference_is_up_to_date():
    # Regenerate with: tokenfleet settings --markdown (see deploy/ENV.md's header)
    assert WorkerSettings.markdown_table() in (REPO / "deploy" / "ENV.md").read_text()


def test_readme_documents_every_setting():
    readme = (REPO / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(WorkerSettings)
               if f"`TOKENFLEET_{f.name.upper()}`" not in readme]
    assert not missing, f"add these to README's Configuration table: {missing}"
