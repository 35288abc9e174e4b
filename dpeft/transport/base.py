"""Transport interfaces between the round engine and workers.

The coordinator core talks to a :class:`CoordinatorTransport`; a worker runtime talks to a
:class:`WorkerConnection`. Both sides exchange the dataclasses below, never protobuf types.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from dpeft.codec.tensors import StateDecoder
from dpeft.state import AdapterState


@dataclass
class TrainTask:
    """One client's local training job for one round."""

    task_id: str
    round: int
    client_id: int
    blob_id: str
    blob_size: int
    blob_sha256: bytes
    hyperparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """A validated, decoded update as delivered by a transport."""

    task_id: str
    client_id: int
    worker_id: str
    delta: AdapterState
    num_examples: int
    metrics: dict[str, float]
    bytes_up: int


@dataclass
class Rejection:
    """An update the transport refused (bad bytes, unknown task, ...)."""

    task_id: str
    worker_id: str
    reason: str
    detail: str


@dataclass
class WorkerRegistration:
    """What the coordinator tells a worker when it joins."""

    run_id: str
    session: str
    config: dict[str, Any]
    client_ids: list[int]
    heartbeat_s: float


Event = Union[TaskResult, Rejection]
#: Builds a validating decoder for an upload of ``task_id`` (raises RejectedUpdate if the task is unknown).
DecoderFactory = Callable[[str, int], StateDecoder]


class CoordinatorTransport(abc.ABC):
    """Coordinator side: publish payloads and tasks, collect results as they arrive."""

    @abc.abstractmethod
    def start(self) -> str:
        """Start serving; return the address workers should dial."""

    @abc.abstractmethod
    def publish_blob(self, blob_id: str, payload: bytes) -> None:
        """Make a payload (an encoded global adapter) downloadable; older blobs may be dropped."""

    @abc.abstractmethod
    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        """Queue tasks; ``pinned`` maps client ids to the worker that owns their data."""

    @abc.abstractmethod
    def next_event(self, timeout: float) -> Event | None:
        """The next result or rejection, or None after ``timeout`` seconds."""

    @abc.abstractmethod
    def cancel_pending(self) -> list[str]:
        """Drop queued tasks that no worker has taken; return their ids."""

    def forget_tasks(self, task_ids: list[str]) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The engine gave up on these tasks (no reply in time): drop them if still queued or in flight."""

    @abc.abstractmethod
    def workers(self) -> dict[str, dict[str, Any]]:
        """Known workers: id -> {own_data, client_ids, last_seen, alive, tasks_done, ...}."""

    @abc.abstractmethod
    def bytes_moved(self) -> tuple[int, int]:
        """(bytes received from workers, bytes sent to workers) so far."""

    @abc.abstractmethod
    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        """Tell workers to stop, wait up to ``grace_s`` for them to leave, stop serving."""


class WorkerConnection(abc.ABC):
    """Worker side of a transport."""

    @abc.abstractmethod
    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        """Register; returns the run config and owned client ids."""

    @abc.abstractmethod
    def poll(self) -> TrainTask | float | str:
        """A task, a number of seconds to wait, or a stop reason (str)."""

    @abc.abstractmethod
    def fetch(self, task: TrainTask) -> bytes:
        """The payload a task refers to (cached by blob id)."""

    @abc.abstractmethod
    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        """Upload an update; (accepted, reason)."""

    @abc.abstractmethod
    def leave(self) -> None:
        """Say goodbye and close."""
