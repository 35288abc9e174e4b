"""benchmarks/gpu_check.py on a machine without a usable GPU: every check SKIP, at once, and the report written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_without_cuda_every_check_is_skipped(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path / "out"))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    names = ["simulate-2proc", "bf16", "nf4", "lockstep", "generate", "allreduce-nccl", "split-cloud", "ray-half-gpu"]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == names
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "SKIP" and "no CUDA GPU visible" in cells[4], row
    assert "0 PASS, 0 FAIL, 8 SKIP" in report
    assert proc.stdout.strip() == report.strip()  # printed as written
    assert took < 60  # no run was started


def test_unknown_check_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "nope", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "unknown check(s): nope" in proc.stderr


def test_a_check_whose_keys_this_dpeft_lacks_is_skipped_with_the_config_error(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    check = gpu_check.Check("future", "a key that does not exist", ["simulate"], ["model.no_such_key=1"])
    status, took, detail = gpu_check.run_check(check, tmp_path, tmp_path, timeout_s=10)
    assert (status, took) == ("SKIP", 0.0)
    assert detail == "config: model.no_such_key: unknown key"
