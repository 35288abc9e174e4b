"""Simulated heterogeneity wraps the real worker: dropped tasks never reach it, slow clients'
updates are pushed late (or abandoned when the worker leaves), Byzantine clients' updates are
corrupted through the runtime's update hook, seeded per (seed, round, client)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from dpeft.state import AdapterState
from dpeft.transport.base import TrainTask, WorkerConnection, WorkerRegistration
from dpeft.validate import load_config
from dpeft_workers.simulate import Heterogeneity, SimulatedConnection, simulated_worker


class _Queue(WorkerConnection):
    """An in-memory worker connection: hands out ``tasks``, records pushes (with their time)."""

    def __init__(self, tasks: list[TrainTask]) -> None:
        self.tasks = tasks
        self.pushed: list[tuple[str, float, dict[str, float]]] = []
        self.left = False
        self.stop_requested = threading.Event()

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        return WorkerRegistration("run", "s", {}, [], 5.0)

    def poll(self) -> TrainTask | float | str:
        return self.tasks.pop(0) if self.tasks else "done"

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        if not self.tasks:
            return "done"
        out, self.tasks = self.tasks[:max_tasks], self.tasks[max_tasks:]
        return out

    def fetch(self, task: TrainTask) -> bytes:
        return b""

    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        self.pushed.append((task.task_id, time.monotonic(), dict(metrics)))
        return True, ""

    def leave(self) -> None:
        self.left = True


def _tasks(n: int) -> list[TrainTask]:
    return [TrainTask(f"t{r}-{c}", r, c, "b", 0, b"") for r in range(1, n + 1) for c in range(10)]


def test_dropped_tasks_never_reach_the_worker() -> None:
    cfg = load_config(None, ["simulate.dropout=0.3", "seed=5"])
    sim = Heterogeneity(cfg)
    tasks = _tasks(5)
    conn = SimulatedConnection(_Queue(list(tasks)), sim)
    got: list[str] = []
    while not isinstance(item := conn.poll_many(4), str):
        if isinstance(item, list):
            got.extend(t.task_id for t in item)
    assert got == [t.task_id for t in tasks if not sim.drops(t)]
    assert 0 < len(got) < len(tasks)
    assert conn.stop_requested is conn._conn.stop_requested  # the rest is the real connection's


def test_a_slow_clients_update_is_pushed_late_and_abandoned_on_leave() -> None:
    cfg = load_config(None, ["simulate.speed_factors=[1, 3]"])
    inner = _Queue([])
    conn = SimulatedConnection(inner, Heterogeneity(cfg))
    fast, slow, slower = TrainTask("fast", 1, 0, "b", 0, b""), TrainTask("slow", 1, 1, "b", 0, b""), TrainTask("slower", 1, 3, "b", 0, b"")
    t0 = time.monotonic()
    assert conn.push(fast, b"u", 1, {"compute_s": 0.1}) == (True, "")
    assert conn.push(slow, b"u", 1, {"compute_s": 0.1}) == (True, "")  # factor 3: 0.2 s late
    assert [p[0] for p in inner.pushed] == ["fast"]
    deadline = time.monotonic() + 5
    while len(inner.pushed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    task_id, at, metrics = inner.pushed[1]
    assert task_id == "slow" and at - t0 >= 0.2 and abs(metrics["simulated_delay_s"] - 0.2) < 1e-9
    conn.push(slower, b"u", 1, {"compute_s": 5.0})  # 10 s late: the worker leaves first
    conn.leave()
    time.sleep(0.1)
    assert inner.left and [p[0] for p in inner.pushed] == ["fast", "slow"]


class _Runtime:
    update_hook: Any = None


def test_byzantine_clients_are_corrupted_through_the_update_hook_only_when_configured() -> None:
    plain = _Runtime()
    simulated_worker(load_config(None, []), _Queue([]), plain)
    assert plain.update_hook is None
    cfg = load_config(None, ["simulate.byzantine_clients=[2]", "simulate.byzantine_scale=-10", "simulate.byzantine_random_sign=true"])
    runtime = _Runtime()
    conn = simulated_worker(cfg, _Queue([]), runtime)
    assert isinstance(conn, SimulatedConnection)
    delta = AdapterState(OrderedDict(a=torch.ones(4, 3)), {"round": 1})
    honest = runtime.update_hook(TrainTask("t", 1, 1, "b", 0, b""), delta)
    assert honest is delta
    bad = runtime.update_hook(TrainTask("t", 1, 2, "b", 0, b""), delta)
    again = Heterogeneity(cfg).corrupt(TrainTask("t", 1, 2, "b", 0, b""), delta)
    assert torch.equal(bad["a"], again["a"]) and set(bad["a"].abs().flatten().tolist()) == {10.0}  # seeded signs
    assert bad.meta == delta.meta
