"""`dpeft simulate` end to end (real coordinator and worker processes on loopback gRPC).

Tiny settings so each run takes well under a minute on two cores: flexlora with
heterogeneous ranks, and the deadline and async policies with simulated stragglers and
dropouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from simulate_runs import simulate_rows

pytestmark = pytest.mark.integration

TINY = [
    "clients=4",
    "clients_per_round=2",
    "train.local_steps=3",
    "train.batch_size=8",
    "data.max_train_examples=300",
    "data.test_examples=64",
    "data.partition=iid",
    "simulate.processes=2",
    "model.max_length=32",
]


def simulate(run_dir: Path, *overrides: str, timeout: float = 400) -> list[dict]:
    return simulate_rows(run_dir, TINY, *overrides, timeout=timeout)


def test_flexlora_heterogeneous_ranks_every_client_gets_its_own(tmp_path) -> None:
    ranks = [4, 8, 16]
    rows = simulate(
        tmp_path / "run", "rounds=2", "clients=3", "clients_per_round=3", "adapter.r=16", "strategy.name=flexlora",
        f"strategy.options={{client_ranks: {ranks}}}",
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 3 and r["rejected"] == 0
        # each client reports the rank it trained at, which is the rank of the payload it received
        assert r["client_ranks"] == {str(c): ranks[c % 3] for c in r["sampled"]}
        assert 0 <= r["flexlora_truncation_error"] < 1
    assert rows[-1]["eval_loss"] < 0.75
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 16


def test_deadline_with_stragglers_and_dropouts(tmp_path) -> None:
    rows = simulate(
        tmp_path / "run", "rounds=2", "sync.name=deadline", "sync.over_selection=2", "sync.deadline_s=20",
        "sync.late_updates=fold", "simulate.speed_factors=[1, 1, 8, 8]", "simulate.dropout=0.2",
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["sync"] == "deadline" and len(r["sampled"]) == 4
        assert 1 <= r["clients"] <= 4 and r["eval_accuracy"] is not None
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_async_with_stragglers_and_dropouts(tmp_path) -> None:
    rows = simulate(
        tmp_path / "run", "rounds=3", "sync.name=async", "sync.buffer_size=2", "sync.concurrency=3", "sync.task_timeout_s=60",
        "simulate.speed_factors=[1, 3]", "simulate.dropout=0.1",
    )
    steps = rows[1:]
    assert [r["round"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["sync"] == "async" and r["clients"] == 2
        assert {"staleness_mean", "staleness_max", "dropped_stale", "in_flight", "eval_accuracy"} <= set(r)
    assert any((tmp_path / "run" / "checkpoints").iterdir())  # one checkpoint per aggregation step, as for rounds
