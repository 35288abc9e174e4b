"""Typed control messages of the coordinator protocol (what :mod:`dpeft.transport.serde`
converts to and from protobuf). Plain dataclasses: no protobuf type outside serde."""

from __future__ import annotations

from dataclasses import dataclass, field

from dpeft.transport.base import TrainTask


@dataclass
class WorkerJoin:
    """A worker asks to join (JoinRequest)."""

    worker_id: str
    token: str = ""
    own_data: bool = False
    own_examples: int = 0
    #: task kinds run besides training (e.g. "evaluate"); none from older workers
    task_kinds: list[str] = field(default_factory=list)


@dataclass
class JoinAnswer:
    """The coordinator's answer to a join (JoinReply): the run config travels as YAML text."""

    run_id: str
    session: str
    config_yaml: str
    client_ids: list[int]
    heartbeat_s: float


@dataclass
class SessionCall:
    """A call that only identifies the worker's session (HeartbeatRequest, LeaveRequest)."""

    worker_id: str
    session: str


@dataclass
class PollAsk:
    """PollRequest: up to ``max_tasks`` tasks (0 counts as 1)."""

    worker_id: str
    session: str
    max_tasks: int = 1


@dataclass
class PollAnswer:
    """PollReply: tasks, or a number of seconds to wait, or the reason the run stopped."""

    tasks: list[TrainTask] = field(default_factory=list)
    wait_s: float = 0.0
    stop_reason: str | None = None


@dataclass
class FetchAsk:
    """FetchRequest: a payload from byte ``offset``, with CRC-32C (``crc32c``) or CRC-32 chunk checksums."""

    worker_id: str
    session: str
    blob_id: str
    offset: int = 0
    crc32c: bool = False


@dataclass
class UploadQueryAsk:
    """UploadQuery: how much of an upload the coordinator holds."""

    worker_id: str
    session: str
    task_id: str


@dataclass
class UploadProgress:
    """UploadStatus: bytes of an upload held, of ``size``."""

    received: int = 0
    size: int = 0


@dataclass
class UpdateHeader:
    """The first message of an upload. Identified by ``crc32c`` (whole-payload CRC-32C) or
    ``crc32`` (CRC-32) with ``sha256`` empty, or by ``sha256``; ``offset`` > 0 resumes."""

    worker_id: str
    session: str
    task_id: str
    client_id: int
    num_examples: int
    metrics: dict[str, float]
    size: int
    sha256: bytes = b""
    offset: int = 0
    crc32: int | None = None
    crc32c: int | None = None


@dataclass
class UploadVerdict:
    """UpdateAck: accepted, or why not ("incomplete": resume from ``received``)."""

    accepted: bool
    reason: str = ""
    received: int = 0


@dataclass
class HeartbeatAnswer:
    """HeartbeatReply."""

    stop: bool = False
    round: int = 0


@dataclass
class WorkerState:
    """One worker in a status report."""

    worker_id: str
    state: str
    last_seen: float = 0.0
    tasks_done: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    own_data: bool = False
    client_ids: list[int] = field(default_factory=list)
    current_task: str = ""
    address: str = ""


@dataclass
class CoordinatorStatus:
    """StatusReply: the run's progress (``dpeft status``)."""

    run_id: str = ""
    round: int = 0
    total_rounds: int = 0
    tasks_submitted: int = 0
    tasks_done: int = 0
    tasks_pending: int = 0
    tasks_inflight: int = 0
    uploads_partial: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: int = 0
    stop_reason: str = ""
    uptime_s: float = 0.0
    workers: list[WorkerState] = field(default_factory=list)
