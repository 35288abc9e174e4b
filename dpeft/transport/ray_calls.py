"""The Ray transport's bookkeeping of actors and calls in flight (see :mod:`dpeft.transport.ray_transport`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpeft.transport.base import TrainTask
from dpeft.transport.queue import Assignment
from dpeft.transport.ray_pool import PoolMember
from dpeft.transport.registry import WorkerRecord

__all__ = ["ActorSlot", "ActorCall", "NoHeterogeneity", "compute_s"]


class NoHeterogeneity:
    """Real clients: no task is dropped and no reply is held back (simulate applies its own, see
    ``dpeft_workers.simulate.Heterogeneity``, which the launcher hands in instead)."""

    def drops(self, task: TrainTask) -> bool:
        return False

    def delay_s(self, client_id: int, compute_s: float) -> float:
        return 0.0


@dataclass
class ActorSlot:
    """A pool member as the transport schedules it (its registry record holds the counters)."""

    member: PoolMember
    record: WorkerRecord
    busy: bool = False
    probing: bool = False
    blobs_seen: set[str] = field(default_factory=set)

    @property
    def worker_id(self) -> str:
        return self.member.worker_id

    @property
    def handle(self) -> Any:
        return self.member.handle


@dataclass
class ActorCall:
    """An actor call in flight: a task (several with lockstep), or a readiness probe (no tasks)."""

    actor: ActorSlot
    assignments: list[Assignment] = field(default_factory=list)

    @property
    def tasks(self) -> list[TrainTask]:
        return [a.task for a in self.assignments]


def compute_s(value: Any) -> float:
    """The ``compute_s`` metric of an actor's result (0 when it has none)."""
    try:
        return float(value[2].get("compute_s", 0.0))
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return 0.0
