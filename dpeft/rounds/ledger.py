"""The task ledger: which training tasks are open, done, late or missed, and whether an update is welcome.

Pure bookkeeping under one lock (transport threads ask :meth:`TaskLedger.schema_for` while the
round loop admits, expires and closes); it never talks to a transport. A task is

- *open* from :meth:`register` until its update is admitted or refused, it expires, or its round closes;
- *late* when its round closed without it but the deadline policy folds it into a later step;
- *missed* when its round closed without it (an update for it is refused as ``late``);
- *done* once nothing more is accepted for it: an update for it is refused as ``duplicate`` when
  one was admitted already, else as ``closed`` (its round or the run ended, or it was given up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dpeft.codec.validation import check_norm, check_update
from dpeft.errors import RejectedUpdate
from dpeft.strategies import ClientUpdate
from dpeft.transport.base import TaskResult, TrainTask


@dataclass
class TaskInfo:
    """Bookkeeping of one registered task."""

    task: TrainTask
    schema: Any  # what the update must look like (names, shapes, dtypes)
    version: int  # the global version (aggregation steps done) the client starts from
    submitted: float
    attempt: int = 0


class TaskLedger:
    """Open / late / missed / done tasks and the checks an update passes before it is aggregated.

    ``max_staleness`` bounds ``tau`` (aggregation steps between a task's dispatch and its
    update); an admitted stale update's example weight is scaled by ``staleness_weight(tau)``.
    """

    def __init__(self, max_staleness: int, staleness_weight: Callable[[int], float]) -> None:
        self.max_staleness = max_staleness
        self.staleness_weight = staleness_weight
        self._lock = threading.Lock()
        self._open: dict[str, TrainTask] = {}
        self._done: set[str] = set()
        self._info: dict[str, TaskInfo] = {}
        self._late: dict[str, TrainTask] = {}  # deadline fold: tasks whose round closed, still accepted
        self._missed: set[str] = set()  # tasks whose round closed without them (their updates are "late")
        self._admitted: set[str] = set()  # tasks whose update was aggregated (another one is a "duplicate")

    def register(self, task: TrainTask, schema: Any, version: int, now: float) -> None:
        """Open ``task``: its client starts from global version ``version``; its update must match ``schema``."""
        with self._lock:
            self._open[task.task_id] = task
            self._info[task.task_id] = TaskInfo(task, schema, version, now)

    def is_open(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._open

    def schema_for(self, task_id: str, client_id: int, current_round: int) -> Any | None:
        """The schema an upload for ``task_id`` must match (None: not recorded); refuses unknown,
        late, duplicate and wrong-client uploads up front with :class:`RejectedUpdate`."""
        with self._lock:
            task = self._open.get(task_id) or self._late.get(task_id)
            if task is None:
                reason = self._closed_reason(task_id, "unknown_task")
                raise RejectedUpdate(reason, f"task {task_id!r} is not open (round {current_round})")
            if task.client_id != client_id:
                raise RejectedUpdate("wrong_client", f"task {task_id!r} belongs to client {task.client_id}")
            info = self._info.get(task_id)
        return info.schema if info is not None else None

    def _closed_reason(self, task_id: str, unknown: str) -> str:
        """Why an update for a task that is not open is refused (call under the lock)."""
        if task_id in self._admitted:
            return "duplicate"
        if task_id in self._missed:
            return "late"
        return "closed" if task_id in self._done else unknown

    def admit(self, result: TaskResult, current_round: int, max_norm: float | None) -> ClientUpdate:
        """The update of ``result`` as the strategy aggregates it, or :class:`RejectedUpdate`
        (closed, too stale, non-finite, over the norm bound, no examples). Admitted: the task is done."""
        weight = 1.0
        with self._lock:
            if result.task_id not in self._open and result.task_id not in self._late:
                raise RejectedUpdate(self._closed_reason(result.task_id, "stale"), f"task {result.task_id} already closed")
            info = self._info.get(result.task_id)
            tau = current_round - info.version if info is not None else 0
            if tau > self.max_staleness:
                self._late.pop(result.task_id, None)
                self._open.pop(result.task_id, None)
                self._done.add(result.task_id)
                raise RejectedUpdate("too_stale", f"task {result.task_id} is {tau} steps stale (sync.max_staleness={self.max_staleness})")
            if tau > 0:
                weight = self.staleness_weight(tau)
        norm = result.norm if result.norm is not None else check_update(result.delta)  # NaN/Inf: "non_finite"
        check_norm(norm, max_norm)
        if result.num_examples <= 0:
            raise RejectedUpdate("num_examples", "an update must report at least one example")
        with self._lock:
            self._open.pop(result.task_id, None)
            self._late.pop(result.task_id, None)
            self._info.pop(result.task_id, None)
            self._done.add(result.task_id)
            self._admitted.add(result.task_id)
        metrics = dict(result.metrics, staleness=float(tau))
        # a stale update counts less: its example weight is scaled by s(tau) (num_examples may become a float)
        num = result.num_examples * weight if weight != 1.0 else result.num_examples
        return ClientUpdate(result.client_id, result.delta, num, metrics)  # type: ignore[arg-type]

    def drop(self, task_id: str) -> None:
        """An open task whose update was refused: nothing more is accepted for it."""
        with self._lock:
            if self._open.pop(task_id, None) is not None:
                self._info.pop(task_id, None)
                self._done.add(task_id)

    def expire(self, task_ids: list[str], timeout: float, reassign: bool, now: float) -> tuple[list[TrainTask], list[str]]:
        """Open tasks among ``task_ids`` without a reply for ``timeout`` seconds: with ``reassign``
        re-open them as a new attempt (returned first, to submit again), else give them up
        (returned second, missed). Returns (tasks to re-submit, task ids given up)."""
        again: list[TrainTask] = []
        lost: list[str] = []
        with self._lock:
            for tid in task_ids:
                info = self._info.get(tid)
                if tid not in self._open or info is None or now - info.submitted < timeout:
                    continue
                if reassign:
                    info.attempt += 1
                    info.submitted = now
                    info.task = replace(info.task, hyperparams={**info.task.hyperparams, "attempt": info.attempt})
                    self._open[tid] = info.task
                    again.append(info.task)
                else:
                    self._open.pop(tid)
                    self._info.pop(tid, None)
                    self._done.add(tid)
                    self._missed.add(tid)
                    lost.append(tid)
        return again, lost

    def close_round(self, round_num: int, fold: bool, cancelled: set[str]) -> None:
        """Round ``round_num`` closed: its open tasks become late (``fold``, unless ``cancelled``
        before a worker took them) or missed; late tasks past ``max_staleness`` become missed."""
        with self._lock:
            if fold:
                for tid, task in self._open.items():
                    if tid not in cancelled:
                        self._late[tid] = task
                    else:
                        self._info.pop(tid, None)
            else:
                for tid in self._open:
                    self._info.pop(tid, None)
                self._missed.update(self._open)
            self._done.update(t for t in self._open if t not in self._late)
            self._open = {}
            for tid in [t for t in self._late if round_num - self._info[t].version > self.max_staleness]:
                self._late.pop(tid)
                self._info.pop(tid, None)
                self._done.add(tid)
                self._missed.add(tid)

    def close_all(self) -> None:
        """The run stopped: every open (or late) task is done."""
        with self._lock:
            self._done.update(self._open)
            self._done.update(self._late)
            self._open = {}
            self._late = {}
            self._info.clear()
