"""`dpeft simulate` with work-conserving workers and overlapped evaluation, end to end.

Three clients per round over two worker processes leave each round's last task to one process;
with ``simulate.work_conserving`` it takes over the idle core, and the coordinator's evaluation
shares the budget while the next round trains. The adapter equals the one of a run with fixed
threads and sequential evaluation (to the tolerance of thread-count changes under AdamW,
``tests/train/test_core_budget.py``), and the threads claimed never exceeded the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpeft.train.cores import CoreBudget

pytestmark = pytest.mark.integration

TINY = [
    "rounds=2",
    "clients=4",
    "clients_per_round=3",
    "train.local_steps=3",
    "train.batch_size=8",
    "data.max_train_examples=120",
    "data.test_examples=32",
    "data.partition=iid",
    "simulate.processes=2",
    "model.max_length=24",
]


def _simulate(run_dir: Path, *overrides: str) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", *TINY, f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_work_conserving_run_gives_the_fixed_thread_adapter_within_budget(tmp_path) -> None:
    rows = _simulate(tmp_path / "wc", "simulate.work_conserving=true", "eval.overlap=true")
    fixed = _simulate(tmp_path / "fixed", "simulate.work_conserving=false", "eval.overlap=false")
    for got in (rows, fixed):  # complete rows, in order, each with its evaluation
        assert [r["round"] for r in got] == [0, 1, 2]
        assert all(r["eval_accuracy"] is not None for r in got) and all(r["clients"] == 3 for r in got[1:])
    assert [r["sampled"] for r in rows[1:]] == [r["sampled"] for r in fixed[1:]]
    assert not (tmp_path / "fixed" / "cores.budget").exists()

    a, b = _adapter(tmp_path / "wc"), _adapter(tmp_path / "fixed")
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k].pow(2).sum()) for k in a) ** 0.5
    assert diff / norm <= 1e-3, diff / norm
    assert abs(rows[-1]["eval_loss"] - fixed[-1]["eval_loss"]) < 1e-3

    stats = CoreBudget(tmp_path / "wc" / "cores.budget", 0).stats()
    assert stats["budget"] == 2 and stats["claimed"] == 0  # everything given back
    assert 1 <= stats["peak"] <= stats["budget"]  # the summed claims, checked at every step, never exceeded it
    workers, evaluation = stats["steps"][:2], stats["steps"][2]
    assert sum(workers) >= 2 * 3 * 3  # every training step claimed its cores (2 rounds x 3 clients x 3 steps)
    assert evaluation > 0 and stats["max_threads"][2] == 2  # the last evaluation, alone, ran on both cores
