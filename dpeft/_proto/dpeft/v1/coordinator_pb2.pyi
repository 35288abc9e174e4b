from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("worker_id", "token", "own_data", "own_examples", "version", "task_kinds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWN_DATA_FIELD_NUMBER: _ClassVar[int]
    OWN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_KINDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    token: str
    own_data: bool
    own_examples: int
    version: str
    task_kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., token: _Optional[str] = ..., own_data: _Optional[bool] = ..., own_examples: _Optional[int] = ..., version: _Optional[str] = ..., task_kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "session", "config_yaml", "client_ids", "heartbeat_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    session: str
    config_yaml: str
    client_ids: _containers.RepeatedScalarFieldContainer[int]
    heartbeat_s: float
    def __init__(self, run_id: _Optional[str] = ..., session: _Optional[str] = ..., config_yaml: _Optional[str] = ..., client_ids: _Optional[_Iterable[int]] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("worker_id", "session", "max_tasks")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    max_tasks: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("task_id", "round", "client_id", "blob_id", "blob_size", "blob_sha256", "hyperparams_json", "blob_crc32", "blob_crc32c", "kind")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOB_CRC32_FIELD_NUMBER: _ClassVar[int]
    BLOB_CRC32C_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    client_id: int
    blob_id: str
    blob_size: int
    blob_sha256: bytes
    hyperparams_json: str
    blob_crc32: int
    blob_crc32c: int
    kind: str
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[int] = ..., blob_id: _Optional[str] = ..., blob_size: _Optional[int] = ..., blob_sha256: _Optional[bytes] = ..., hyperparams_json: _Optional[str] = ..., blob_crc32: _Optional[int] = ..., blob_crc32c: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class PollReply(_message.Message):
    __slots__ = ("task", "wait_s", "stop_reason", "more_tasks")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    MORE_TASKS_FIELD_NUMBER: _ClassVar[int]
    task: TrainTask
    wait_s: float
    stop_reason: str
    more_tasks: _containers.RepeatedCompositeFieldContainer[TrainTask]
    def __init__(self, task: _Optional[_Union[TrainTask, _Mapping]] = ..., wait_s: _Optional[float] = ..., stop_reason: _Optional[str] = ..., more_tasks: _Optional[_Iterable[_Union[TrainTask, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("worker_id", "session", "blob_id", "offset", "crc32c")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    blob_id: str
    offset: int
    crc32c: bool
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ..., blob_id: _Optional[str] = ..., offset: _Optional[int] = ..., crc32c: _Optional[bool] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32", "crc32c")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    crc32c: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("worker_id", "session", "task_id", "client_id", "num_examples", "metrics", "size", "sha256", "offset", "crc32", "crc32c")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    task_id: str
    client_id: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    size: int
    sha256: bytes
    offset: int
    crc32: int
    crc32c: int
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ..., task_id: _Optional[str] = ..., client_id: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., crc32: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32", "crc32c")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    crc32c: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    chunk: DataChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., chunk: _Optional[_Union[DataChunk, _Mapping]] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("accepted", "reason", "received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    received: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., received: _Optional[int] = ...) -> None: ...

class UploadQuery(_message.Message):
    __slots__ = ("worker_id", "session", "task_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    task_id: str
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("received", "size")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    received: int
    size: int
    def __init__(self, received: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "state", "last_seen", "tasks_done", "bytes_up", "bytes_down", "own_data", "client_ids", "current_task", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    OWN_DATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TASK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    state: str
    last_seen: float
    tasks_done: int
    bytes_up: int
    bytes_down: int
    own_data: bool
    client_ids: _containers.RepeatedScalarFieldContainer[int]
    current_task: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., state: _Optional[str] = ..., last_seen: _Optional[float] = ..., tasks_done: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., own_data: _Optional[bool] = ..., client_ids: _Optional[_Iterable[int]] = ..., current_task: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "round", "total_rounds", "tasks_submitted", "tasks_done", "tasks_pending", "tasks_inflight", "uploads_partial", "bytes_up", "bytes_down", "stop_reason", "workers", "uptime_s", "rejected")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TASKS_SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_PENDING_FIELD_NUMBER: _ClassVar[int]
    TASKS_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    total_rounds: int
    tasks_submitted: int
    tasks_done: int
    tasks_pending: int
    tasks_inflight: int
    uploads_partial: int
    bytes_up: int
    bytes_down: int
    stop_reason: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    uptime_s: float
    rejected: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., tasks_submitted: _Optional[int] = ..., tasks_done: _Optional[int] = ..., tasks_pending: _Optional[int] = ..., tasks_inflight: _Optional[int] = ..., uploads_partial: _Optional[int] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., stop_reason: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., rejected: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("stop", "round")
    STOP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    round: int
    def __init__(self, stop: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "session")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    session: str
    def __init__(self, worker_id: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
