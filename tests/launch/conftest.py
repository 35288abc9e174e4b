"""Integration fixtures: real `dpeft` processes, and no process may outlive its test.

Every test in this directory gets the autouse ``procs`` fixture (an
:class:`integration_testlib.Procs`): processes started through it, and every descendant seen
while they ran (polled with psutil every 0.2 s), are checked at teardown; anything still alive
is killed by pid and the test fails. Runs are tiny (MiniLM, a few hundred examples) because the
machine has two cores. Helpers (``procs.run`` = run `dpeft ARGS` with a timeout and captured
output, ``overrides``, ``read_metrics``...) live in ``integration_testlib.py``.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import pytest
from integration_testlib import Procs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def procs() -> Any:
    """Start dpeft processes through this; no process it saw may outlive the test."""
    registry = Procs()
    yield registry
    left = registry.leftovers(grace_s=2.0)
    described = []
    for p in left:
        try:
            described.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            described.append(f"pid {p.pid}")
    for s in registry.started:
        s.kill_tree()
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    if left:
        pytest.fail("processes left behind after the test (killed now):\n" + "\n".join(described))
