"""benchmarks/gpu_check.py runs end to end at tiny shapes on the CPU (its --dry-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_passes_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["failures"] == []
    assert all(row["ok"] for row in report["kernels"])
    assert all(row["ok"] and row["tokens_equal_to_hf"] == row["of"] for row in report["parity"])
    assert set(report["hf_bench"]) == {"1", "4"}
    assert set(report["engine_bench"]) == {"1", "4", "4 again"}  # the largest batch twice
    assert "| batch | ours tok/s" in proc.stdout  # the table the device reply carries
    cases = [row["case"] for row in report["attention_bench"]]
    assert cases == ["decode b2 ctx40", "rotary+store_kv b2", "norm+gemv tiny 48x64",
                     "silu_mul+gemv tiny 40x96", "gemv tiny 40x96", "row_stats 2x512"]
    assert all("wrong_configs" not in row and row["fused_us"] > 0
               for row in report["attention_bench"][2:5])
    assert "rotary+store_kv b2 per layer" in proc.stdout
