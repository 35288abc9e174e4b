"""The coordinator's worker registry: who joined, their client slots, liveness, persistence.

Shared by the gRPC transport (workers dial in, join, heartbeat, leave) and the Ray transport
(actors are registered when the pool starts). Not thread-safe: the owning transport serialises
access under its own lock. The client ids each worker holds can be kept in a JSON file, so a
restarted coordinator hands every worker the same clients.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpeft.errors import DpeftError
from dpeft.fsutil import atomic_write

log = logging.getLogger("dpeft.transport.registry")


class NoFreeClientSlot(DpeftError):
    """Every client slot is held by a worker with its own data."""


@dataclass
class WorkerRecord:
    """One worker as the coordinator knows it."""

    worker_id: str
    session: str = ""
    own_data: bool = False
    own_examples: int = 0
    client_ids: list[int] = field(default_factory=list)
    joined: float = 0.0
    last_seen: float = 0.0
    alive: bool = False
    left: bool = False
    tasks_done: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    address: str = ""
    current_task: str = ""
    #: task kinds the worker runs besides training (``TrainTask.kind``, e.g. "evaluate")
    task_kinds: list[str] = field(default_factory=list)
    #: transport-specific facts shown with the worker (a Ray actor's pid, node, restarts, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Alive and not gone for good."""
        return self.alive and not self.left

    @property
    def state(self) -> str:
        """left, alive, dead (joined in this process, then silent) or known (from the registry file only)."""
        return "left" if self.left else "alive" if self.alive else "dead" if self.session else "known"

    def as_dict(self) -> dict[str, Any]:
        """The plain-data view :meth:`CoordinatorTransport.workers` returns (no session)."""
        out = {
            "own_data": self.own_data,
            "own_examples": self.own_examples,
            "client_ids": list(self.client_ids),
            "joined": self.joined,
            "last_seen": self.last_seen,
            "alive": self.alive,
            "left": self.left,
            "tasks_done": self.tasks_done,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "address": self.address,
            "current_task": self.current_task,
            "task_kinds": list(self.task_kinds),
        }
        out.update(self.extra)
        return out


class WorkerRegistry:
    """worker id -> :class:`WorkerRecord`, with client slot assignment and liveness."""

    def __init__(self, num_clients: int = 0, path: str | os.PathLike[str] | None = None) -> None:
        self.num_clients = num_clients
        self.path = Path(path) if path else None
        self._records: dict[str, WorkerRecord] = {}

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._records.get(worker_id)

    def add(self, record: WorkerRecord) -> WorkerRecord:
        self._records[record.worker_id] = record
        return record

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {wid: r.as_dict() for wid, r in self._records.items()}

    # -- joining ---------------------------------------------------------------
    def join(
        self, worker_id: str, session: str, own_data: bool, own_examples: int, address: str, now: float, task_kinds: list[str] | None = None
    ) -> tuple[WorkerRecord, WorkerRecord | None]:
        """Register (or re-register) a worker with a fresh session: (its record, the previous one).

        A worker with its own data keeps the client slot it held; a new one gets a never-claimed
        slot first, else one given up by a worker that left (raises :class:`NoFreeClientSlot`).
        Counters carry over a re-join; the registry file is rewritten when the slots changed."""
        prev = self._records.get(worker_id)
        clients = list(prev.client_ids) if prev else []
        if own_data and not clients:
            claimed = {c for r in self._records.values() for c in r.client_ids}
            held = {c for r in self._records.values() if not r.left for c in r.client_ids}
            free = [c for c in range(self.num_clients) if c not in claimed] or [c for c in range(self.num_clients) if c not in held]
            if not free:
                raise NoFreeClientSlot(f"all {self.num_clients} client slots are taken")
            clients = [free[0]]
            for r in self._records.values():
                if r.left and clients[0] in r.client_ids:
                    r.client_ids = [c for c in r.client_ids if c != clients[0]]
        record = WorkerRecord(
            worker_id=worker_id,
            session=session,
            own_data=own_data,
            own_examples=own_examples,
            client_ids=clients,
            joined=now,
            last_seen=now,
            alive=True,
            tasks_done=prev.tasks_done if prev else 0,
            bytes_up=prev.bytes_up if prev else 0,
            bytes_down=prev.bytes_down if prev else 0,
            address=address,
            task_kinds=list(task_kinds or []),
        )
        self._records[worker_id] = record
        if prev is None or prev.client_ids != clients or prev.own_data != own_data:
            self.save()
        return record, prev

    # -- liveness ----------------------------------------------------------------
    def seen(self, record: WorkerRecord, now: float) -> bool:
        """A sign of life; True when it brings a dead worker back."""
        record.last_seen = now
        if not record.alive and not record.left:
            record.alive = True
            return True
        return False

    def silent(self, now: float, dead_after_s: float) -> list[WorkerRecord]:
        """Active workers not seen for ``dead_after_s``: marked dead and returned."""
        gone = [r for r in self._records.values() if r.active and now - r.last_seen > dead_after_s]
        for r in gone:
            r.alive = False
            r.current_task = ""
        return gone

    def mark_left(self, record: WorkerRecord) -> None:
        record.left = True
        record.alive = False
        record.current_task = ""

    def idle_virtual_hosts(self, worker_id: str, busy: set[str]) -> int:
        """Workers that could take virtual clients' tasks now (``worker_id`` itself always counts)."""
        return sum(1 for r in self._records.values() if r.worker_id == worker_id or (r.active and not r.own_data and r.worker_id not in busy))

    def any_active(self) -> bool:
        return any(r.active for r in self._records.values())

    # -- persistence ------------------------------------------------------------------
    def load(self) -> int:
        """Read the registry file (if any): workers with their client ids, not alive. Returns how many."""
        if self.path is None or not self.path.is_file():
            return 0
        try:
            entries = json.loads(self.path.read_text())["workers"]
            records = {
                str(wid): WorkerRecord(
                    worker_id=str(wid),
                    own_data=bool(w.get("own_data", False)),
                    own_examples=int(w.get("own_examples", 0)),
                    client_ids=[int(c) for c in w.get("client_ids", [])],
                )
                for wid, w in entries.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("worker registry %s is unreadable (%s); starting with an empty one", self.path, exc)
            return 0
        self._records = records
        return len(records)

    def save(self) -> None:
        """Write the registry file (own_data, own_examples, client_ids per worker)."""
        if self.path is None:
            return
        data = {"workers": {r.worker_id: {"own_data": r.own_data, "own_examples": r.own_examples, "client_ids": r.client_ids} for r in self._records.values()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, [json.dumps(data, indent=1).encode()])
        except OSError as exc:  # the run goes on; a restart would re-assign client slots
            log.warning("cannot write the worker registry %s: %s", self.path, exc)
