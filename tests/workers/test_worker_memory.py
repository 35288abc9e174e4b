"""A worker's memory does not grow with the number of virtual clients it serves.

Runs tests/workers/_memory_probe.py in a fresh subprocess (so nothing else in the test
session pollutes its RSS): WorkerRuntime for 50 IID clients, two warm-up tasks, then tasks
for 5 distinct clients (RSS), then for all 50 (RSS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("_memory_probe.py")


def test_rss_flat_in_number_of_clients() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(PROBE), "50"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = {k: v / 2**20 for k, v in result.items() if k.startswith("rss")}
    print(
        f"worker RSS: after warm-up {mib['rss_after_warmup']:.1f} MiB, after 5 clients {mib['rss_after_5']:.1f} MiB, "
        f"after 50 clients {mib['rss_after_50']:.1f} MiB ({100 * (mib['rss_after_50'] / mib['rss_after_5'] - 1):+.1f}%)"
    )
    assert result["clients"] == 50
    # a shared base model is loaded: a sanity floor so the probe measured a real worker
    assert mib["rss_after_5"] > 200
    assert mib["rss_after_50"] <= 1.10 * mib["rss_after_5"], mib
