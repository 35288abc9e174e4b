"""The task queue and worker registry shared by the gRPC and Ray transports."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpeft.transport.base import TrainTask
from dpeft.transport.queue import TaskQueue
from dpeft.transport.registry import NoFreeClientSlot, WorkerRegistry


def _task(tid: str, client: int = 0, round_num: int = 1, blob: str = "g") -> TrainTask:
    return TrainTask(tid, round_num, client, blob, 1, b"")


def test_pinned_tasks_go_only_to_their_worker() -> None:
    q = TaskQueue()
    q.submit([_task("a", 0), _task("b", 1)], {0: "owner"})
    assert [a.task.task_id for a in q.take("other", own_data=True)] == []  # data of its own: only its pinned clients
    assert [a.task.task_id for a in q.take("other")] == ["b"]
    assert [a.task.task_id for a in q.take("owner", own_data=True)] == ["a"]


def test_lockstep_fair_share_of_one_round_and_requeue_to_the_front() -> None:
    q = TaskQueue()
    q.submit([_task(f"r1-{i}", i) for i in range(5)] + [_task("r2-0", 0, round_num=2)])
    first = q.take("w0", max_tasks=8, idle_hosts=2)  # ceil(5 / 2)
    assert [a.task.task_id for a in first] == ["r1-0", "r1-1", "r1-2"]
    assert [a.task.task_id for a in q.take("w1", max_tasks=8, idle_hosts=1)] == ["r1-3", "r1-4"]  # never round 2 in the same batch
    assert q.busy_workers() == {"w0", "w1"}
    assert q.requeue_worker("w0") == 3
    assert q.pending_ids() == ["r1-0", "r1-1", "r1-2", "r2-0"] and q.in_flight() == {"r1-3": "w1", "r1-4": "w1"}


def test_accept_drops_tasks_without_counting_them_and_attempts_grow() -> None:
    q = TaskQueue()
    q.submit([_task("drop"), _task("keep")])
    taken = q.take("w", accept=lambda t, attempt: t.task_id != "drop")
    assert [a.task.task_id for a in taken] == ["keep"] and q.pending_count == 0
    q.requeue(taken, next_attempt=True)
    assert q.take("w")[0].attempt == 2


def test_payloads_kept_for_queued_tasks_and_the_newest_round() -> None:
    q = TaskQueue()
    q.submit([_task("a", blob="g1")])
    q.submit([_task("b", round_num=2, blob="g2")])
    assert q.prunable(["g0", "g1", "g2"], keep=0) == ["g0"]  # g1: queued; g2: the newest round
    q.forget(["a"])
    assert q.prunable(["g1", "g2"], keep=0) == ["g1"]


def test_registry_slots_liveness_and_persistence(tmp_path: Path) -> None:
    reg = WorkerRegistry(num_clients=1, path=tmp_path / "workers.json")
    rec, prev = reg.join("alice", "s1", True, 10, "peer", now=100.0)
    assert rec.client_ids == [0] and prev is None
    with pytest.raises(NoFreeClientSlot):
        reg.join("bob", "s2", True, 5, "peer", now=100.0)
    assert [r.worker_id for r in reg.silent(now=200.0, dead_after_s=30)] == ["alice"] and not rec.alive
    assert reg.seen(rec, 201.0) and rec.alive  # back
    again = WorkerRegistry(num_clients=1, path=tmp_path / "workers.json")
    assert again.load() == 1 and again.get("alice").client_ids == [0] and again.get("alice").state == "known"
