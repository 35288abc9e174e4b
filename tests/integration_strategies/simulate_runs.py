"""`dpeft simulate` as a user runs it, for the strategy integration tests: the metrics rows of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def simulate_rows(run_dir: Path, base: Sequence[str], *overrides: str, timeout: float = 400) -> list[dict]:
    """Run ``dpeft simulate --fresh`` with ``base`` then ``overrides`` into ``run_dir``; its metrics rows."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", *base, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
