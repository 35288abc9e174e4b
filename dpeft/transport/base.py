"""Transport interfaces between the round engine and workers.

The coordinator core talks to a :class:`CoordinatorTransport`; a worker runtime talks to a
:class:`WorkerConnection`. Both sides exchange the dataclasses below, never protobuf types.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from dpeft.codec.spool import SpooledBlob
from dpeft.codec.tensors import StateDecoder
from dpeft.state import AdapterState

#: a published payload: in memory, or spooled to a temp file for large adapters
Blob = Union[bytes, SpooledBlob]


@dataclass
class TrainTask:
    """One client's job for one round: local training, or evaluation (``kind``)."""

    task_id: str
    round: int
    client_id: int
    blob_id: str
    blob_size: int
    blob_sha256: bytes
    hyperparams: dict[str, Any] = field(default_factory=dict)
    #: CRC-32 of the payload: the worker checks the chunk CRCs against it instead of re-hashing (None = check blob_sha256)
    blob_crc32: int | None = None
    #: CRC-32C of the payload, filled in by the gRPC coordinator transport (which computes it when
    #: the payload is published); its presence tells a worker the coordinator speaks CRC-32C
    blob_crc32c: int | None = None
    #: "" (training) or "evaluate" (evaluate the payload on the client's held-out examples, reply
    #: with metrics only; see :mod:`dpeft.rounds.fedeval`); a worker refuses kinds it does not know
    kind: str = ""


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
    #: global L2 norm, set when the transport already ran :func:`~dpeft.codec.validation.check_update` (the round core skips its pass)
    norm: float | None = None


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
    def publish_blob(self, blob_id: str, payload: Blob) -> None:
        """Make a payload (an encoded global adapter) downloadable; older blobs may be dropped.

        A :class:`~dpeft.codec.spool.SpooledBlob` (large adapters) is served from its file."""

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

    #: task kinds besides training the worker behind this connection runs (e.g. "evaluate"),
    #: declared when it joins; the worker loop sets them before :meth:`join`
    task_kinds: tuple[str, ...] = ()

    @abc.abstractmethod
    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        """Register; returns the run config and owned client ids."""

    @abc.abstractmethod
    def poll(self) -> TrainTask | float | str:
        """A task, a number of seconds to wait, or a stop reason (str)."""

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        """Up to ``max_tasks`` tasks of one round (for lockstep training), else as :meth:`poll`.

        The default asks for one; a transport that can hand out several at once overrides it.
        """
        item = self.poll()
        return [item] if isinstance(item, TrainTask) else item

    @abc.abstractmethod
    def fetch(self, task: TrainTask) -> bytes | bytearray | mmap.mmap:
        """The payload a task refers to (cached by blob id)."""

    @abc.abstractmethod
    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        """Upload an update; (accepted, reason)."""

    @abc.abstractmethod
    def leave(self) -> None:
        """Say goodbye and close."""
