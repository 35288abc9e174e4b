"""Why an update for a task that is no longer open is refused: duplicate only when one was admitted."""

from __future__ import annotations

import pytest
import torch

from dpeft.errors import RejectedUpdate
from dpeft.rounds.ledger import TaskLedger
from dpeft.state import AdapterState
from dpeft.transport.base import TaskResult, TrainTask


def _task(tid: str, client: int = 0) -> TrainTask:
    return TrainTask(tid, 1, client, "blob", 1, b"\0" * 32)


def _result(tid: str, client: int = 0) -> TaskResult:
    return TaskResult(tid, client, "w0", AdapterState({"a": torch.zeros(2)}), 4, {}, 10)


def _reason(fn) -> str:
    with pytest.raises(RejectedUpdate) as err:
        fn()
    return err.value.reason


def test_reasons_for_closed_tasks() -> None:
    ledger = TaskLedger(max_staleness=10, staleness_weight=lambda tau: 1.0)
    for tid in ("admitted", "missed", "cancelled", "in_flight"):
        ledger.register(_task(tid), None, 0, 0.0)
    ledger.admit(_result("admitted"), 1, None)
    ledger.close_round(1, fold=True, cancelled={"cancelled", "missed"})  # "in_flight" folds into a later step
    ledger.close_all()  # the run ended with "in_flight" still out
    assert _reason(lambda: ledger.schema_for("admitted", 0, 2)) == "duplicate"
    assert _reason(lambda: ledger.admit(_result("admitted"), 2, None)) == "duplicate"
    assert _reason(lambda: ledger.schema_for("cancelled", 0, 2)) == "closed"
    assert _reason(lambda: ledger.schema_for("in_flight", 0, 2)) == "closed"
    assert _reason(lambda: ledger.admit(_result("in_flight"), 2, None)) == "closed"
    assert _reason(lambda: ledger.schema_for("never", 0, 2)) == "unknown_task"

    sync = TaskLedger(max_staleness=0, staleness_weight=lambda tau: 1.0)
    sync.register(_task("slow"), None, 0, 0.0)
    sync.close_round(1, fold=False, cancelled=set())
    assert _reason(lambda: sync.schema_for("slow", 0, 2)) == "late"


def test_only_closed_and_late_are_routine() -> None:
    assert RejectedUpdate("closed", "x").routine and RejectedUpdate("late", "x").routine
    assert not RejectedUpdate("duplicate", "x").routine and not RejectedUpdate("non_finite", "x").routine
