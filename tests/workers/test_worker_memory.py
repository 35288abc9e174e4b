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
import time
from pathlib import Path

import pytest

from dpeft_launch.cli import LEAN_TUNABLES

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("_memory_probe.py")


def _probe(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_worker_sets_fixed_mmap_threshold() -> None:
    """train.worker_mmap_threshold_kib fixes glibc's threshold in the worker process: 3 MiB blocks
    get their own mmap (returned on free) even after glibc's dynamic threshold grew to 32 MiB;
    with null the worker leaves glibc alone and they extend the heap."""
    fixed = _probe("allocator", "2048")
    default = _probe("allocator", "null")
    assert fixed["mmapped_delta"] >= 9 << 20, fixed
    assert default["mmapped_delta"] < 3 << 20, default


def test_rss_flat_in_number_of_clients() -> None:
    result = _probe("50")
    mib = {k: v / 2**20 for k, v in result.items() if k.startswith("rss")}
    print(
        f"worker RSS: after warm-up {mib['rss_after_warmup']:.1f} MiB, after 5 clients {mib['rss_after_5']:.1f} MiB, "
        f"after 50 clients {mib['rss_after_50']:.1f} MiB ({100 * (mib['rss_after_50'] / mib['rss_after_5'] - 1):+.1f}%)"
    )
    assert result["clients"] == 50
    # a shared base model is loaded: a sanity floor so the probe measured a real worker
    assert mib["rss_after_5"] > 200
    assert mib["rss_after_50"] <= 1.10 * mib["rss_after_5"], mib


def _tunables_after_start(env: dict[str, str]) -> set[str]:
    """The glibc.* tunables in the environment of a `dpeft worker` process (same pid) once it is
    up and dialling. glibc parses GLIBC_TUNABLES in place (':' becomes NUL), so this collects
    every glibc.* item of the process's environment block."""
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "worker", "--coordinator", "127.0.0.1:9", "--patience", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        # the CLI re-executes itself before importing anything heavy: once gRPC's extension is
        # mapped, the process runs with the environment it keeps
        deadline = time.time() + 60
        while "cygrpc" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert proc.poll() is None and time.time() < deadline, "the worker exited early or never imported gRPC"
            time.sleep(0.05)
        block = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        items = block.replace("\0", ":").replace("GLIBC_TUNABLES=", ":").split(":")
        return {item for item in items if item.startswith("glibc.")}
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_training_commands_start_without_tcache() -> None:
    """A training command re-executes itself (same pid) with the lean malloc settings (tcache off,
    one arena, fixed mmap and trim thresholds); each tunable the user set is left as it is and the
    others are still added."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("not glibc")
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    lean = set(LEAN_TUNABLES.split(":"))
    assert "glibc.malloc.tcache_count=0" in lean and "glibc.malloc.arena_max=1" in lean
    assert _tunables_after_start(base) == lean

    def others(key: str) -> set[str]:
        return {item for item in lean if not item.startswith(key + "=")}

    mine = "glibc.malloc.tcache_count=7"
    assert _tunables_after_start({**base, "GLIBC_TUNABLES": mine}) == {mine} | others("glibc.malloc.tcache_count")
    other = "glibc.malloc.arena_max=2"
    assert _tunables_after_start({**base, "GLIBC_TUNABLES": other}) == {other} | others("glibc.malloc.arena_max")
    assert _tunables_after_start({**base, "DPEFT_LEAN_MALLOC": "0", "GLIBC_TUNABLES": other}) == {other}
