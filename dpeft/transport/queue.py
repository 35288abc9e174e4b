"""The coordinator's task queue, shared by the gRPC and Ray transports.

Queued tasks wait in order (re-queued ones go back to the front); a task handed to a worker is
in flight until it is finished, forgotten or re-queued. Tasks of a client pinned to a worker
(the worker holds that client's data) go only to that worker; the others go to any worker
without data of its own; a task of another kind than training (evaluation) only to a worker
that declared that kind. With lockstep (several tasks per hand-out) a worker gets its fair
share of one round's tasks: ceil(those tasks / idle hosts, itself included).

The queue also knows which published payloads tasks still need (:meth:`TaskQueue.prunable`).
Not thread-safe: the owning transport serialises access.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from dpeft.transport.base import TrainTask


@dataclass
class Assignment:
    """A task in flight: who runs it, which attempt, since when."""

    worker_id: str
    task: TrainTask
    attempt: int
    since: float


#: called with each task :meth:`TaskQueue.take` pops, in order: False drops it without handing it out
Accept = Callable[[TrainTask, int], bool]


class TaskQueue:
    """Queued and in-flight tasks, pinning, lockstep fair share, and the payloads they need."""

    #: most tasks one hand-out takes (a gRPC PollRequest.max_tasks is capped here)
    max_batch = 64

    def __init__(self) -> None:
        self._pending: deque[tuple[TrainTask, int]] = deque()
        self._inflight: dict[str, Assignment] = {}
        self._pinned: dict[int, str] = {}
        self._blob_round: dict[str, int] = {}
        self.current_round: int | None = None

    # -- views ------------------------------------------------------------------
    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    def pending_ids(self) -> list[str]:
        return [t.task_id for t, _ in self._pending]

    def owner(self, task_id: str) -> str | None:
        """The worker running ``task_id`` (None when it is not in flight)."""
        a = self._inflight.get(task_id)
        return a.worker_id if a else None

    def in_flight(self) -> dict[str, str]:
        """task id -> worker id of the tasks in flight."""
        return {tid: a.worker_id for tid, a in self._inflight.items()}

    def busy_workers(self) -> set[str]:
        return {a.worker_id for a in self._inflight.values()}

    # -- engine side ------------------------------------------------------------------
    def submit(self, tasks: list[TrainTask], pinned: dict[int, str] | None = None) -> None:
        """Queue new tasks (first attempt); ``pinned`` (client id -> worker) replaces the pinning."""
        if pinned is not None:
            self._pinned = dict(pinned)
        for t in tasks:
            self._blob_round[t.blob_id] = max(t.round, self._blob_round.get(t.blob_id, t.round))
            if self.current_round is None or t.round > self.current_round:
                self.current_round = t.round
        self._pending.extend((t, 1) for t in tasks)

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop these tasks, queued or in flight (a late result of one is not wanted)."""
        drop = set(task_ids)
        self._pending = deque(p for p in self._pending if p[0].task_id not in drop)
        for tid in drop:
            self._inflight.pop(tid, None)

    def clear_pending(self) -> list[str]:
        """Drop every queued task; returns their ids."""
        ids = self.pending_ids()
        self._pending.clear()
        return ids

    def clear_inflight(self) -> None:
        self._inflight.clear()

    # -- worker side ------------------------------------------------------------------
    def may_run(self, task: TrainTask, worker_id: str, own_data: bool, kinds: Collection[str] = ()) -> bool:
        """Whether ``worker_id`` may run ``task``: its client is pinned to it (or to no one, for a
        worker without data of its own), and a task of another kind than training is one the
        worker declared (``kinds``)."""
        if task.kind and task.kind not in kinds:
            return False
        owner = self._pinned.get(task.client_id)
        return owner == worker_id or (owner is None and not own_data)

    def take(
        self,
        worker_id: str,
        *,
        own_data: bool = False,
        max_tasks: int = 1,
        idle_hosts: int = 1,
        accept: Accept | None = None,
        kinds: Collection[str] = (),
    ) -> list[Assignment]:
        """Hand tasks to ``worker_id``: the first it may run and, with ``max_tasks`` > 1, more of
        that round and kind up to its fair share (ceil(that round's tasks it may run / ``idle_hosts``)).
        ``kinds``: the task kinds besides training the worker runs.

        ``accept`` sees every task popped; one it refuses is dropped (not handed out, not counted)."""
        mine = [i for i, (t, _) in enumerate(self._pending) if self.may_run(t, worker_id, own_data, kinds)]
        if not mine:
            return []
        limit = min(max(1, max_tasks), self.max_batch)
        if limit > 1:
            first = self._pending[mine[0]][0]
            mine = [i for i in mine if self._pending[i][0].round == first.round and self._pending[i][0].kind == first.kind]
            limit = min(limit, -(-len(mine) // max(1, idle_hosts)))
        taken: list[Assignment] = []
        popped: set[int] = set()
        now = time.time()
        for i in mine:
            if len(taken) >= limit:
                break
            task, attempt = self._pending[i]
            popped.add(i)
            if accept is not None and not accept(task, attempt):
                continue
            a = Assignment(worker_id, task, attempt, now)
            self._inflight[task.task_id] = a
            taken.append(a)
        self._pending = deque(p for i, p in enumerate(self._pending) if i not in popped)
        return taken

    def finish(self, task_id: str) -> Assignment | None:
        """A task's result arrived: no longer queued or in flight. Returns its assignment, if any."""
        self._pending = deque(p for p in self._pending if p[0].task_id != task_id)
        return self._inflight.pop(task_id, None)

    def requeue(self, assignments: list[Assignment], next_attempt: bool = False) -> None:
        """Put in-flight tasks back at the front of the queue, in their order (counted as a new attempt with ``next_attempt``)."""
        for a in reversed(assignments):
            if self._inflight.get(a.task.task_id) is a:
                del self._inflight[a.task.task_id]
            self._pending.appendleft((a.task, a.attempt + 1 if next_attempt else a.attempt))

    def requeue_worker(self, worker_id: str) -> int:
        """Put a gone worker's in-flight tasks back at the front of the queue; returns how many."""
        mine = [a for a in self._inflight.values() if a.worker_id == worker_id]
        self.requeue(mine)
        return len(mine)

    # -- payloads ------------------------------------------------------------------------
    def prunable(self, published: list[str], keep: int) -> list[str]:
        """Payloads (oldest first in ``published``) no task needs: not one of a queued or in-flight
        task, not of the newest round tasks were submitted for (the engine hands those out again
        without republishing: async refills, re-sent tasks, one payload per LoRA rank), and not
        among the newest ``keep``. Forgets the dropped ones' rounds."""
        needed = {t.blob_id for t, _ in self._pending} | {a.task.blob_id for a in self._inflight.values()}
        needed |= {b for b, r in self._blob_round.items() if r == self.current_round}
        drop = [name for name in published[: max(0, len(published) - keep)] if name not in needed]
        for name in drop:
            self._blob_round.pop(name, None)
        return drop

    def forget_payloads(self) -> None:
        self._blob_round.clear()
