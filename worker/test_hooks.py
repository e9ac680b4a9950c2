"""Fault injection for the chaos tests; inert unless the worker runs with `test_hooks` on.

With `TOKENFLEET_TEST_HOOKS=1` (`--test-hooks 1`) a worker that starts a job whose `inputs`
contain `KILL_MARKER` SIGKILLs itself on the spot, before the job reaches the engine: a
"poison" job that takes down every worker that picks it up, until its delivery count passes
`max_deliveries` and it is dead-lettered. Never enable this in production.
"""

from __future__ import annotations

import os
import signal
from typing import Final

from tokenfleet.producer.protocol import Job

__all__ = ["KILL_MARKER", "TestHooks"]

KILL_MARKER: Final = "<tokenfleet-test:kill-worker>"


class TestHooks:
    """Checks each job a worker starts against the markers (no-op when disabled)."""

    __test__ = False  # not a pytest test class

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def on_start(self, job: Job) -> None:
        if self.enabled and job.inputs is not None and KILL_MARKER in job.inputs:
            os.kill(os.getpid(), signal.SIGKILL)
