"""The chaos tests reuse the integration fixtures (real servers, the `fleet` helper) and add
helpers to run fleets of worker processes, kill them, and compare against no-fault output.

Every test module here marks itself `chaos`; run them with `pytest tests/chaos` (and again
with TOKENFLEET_TEST_SERVER=redis for Debian's redis-server 7.0). Helpers shared by the tests
are in chaos_support.py and fuzz_payloads.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_INTEGRATION_CONFTEST = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"


def _load_integration_fixtures() -> ModuleType:
    # conftest modules are not importable by name; load that one under a name of its own.
    name = "tokenfleet_tests_integration_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _INTEGRATION_CONFTEST)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_integration = _load_integration_fixtures()
Fleet = _integration.Fleet
ServerProcess = _integration.ServerProcess
redis_server = _integration.redis_server
redis_url = _integration.redis_url
keys = _integration.keys
redis = _integration.redis
fleet = _integration.fleet
server_process = _integration.server_process


@pytest.fixture
def own_fleet(server_process: Any, keys: Any, tmp_path: Path) -> Iterator[Any]:
    """A `fleet` on the test's own `server_process` (which the test may kill or stall)."""
    helper = Fleet(server_process.url, keys, tmp_path)
    try:
        yield helper
    finally:
        helper.stop_all()
