"""Control messages of the coordinator protocol: protobuf <-> the dataclasses of
:mod:`dpeft.transport.messages` (and :class:`~dpeft.transport.base.TrainTask`).

Every conversion is a symmetric ``x_to_proto`` / ``x_from_proto`` pair. ``*_from_proto`` on
messages a peer sent validates them and raises :class:`~dpeft.errors.ProtocolError` naming
the problem (negative sizes, over-long ids, non-JSON hyperparameters, ...).
"""

from __future__ import annotations

import json
import math
from typing import Any

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.errors import ProtocolError
from dpeft.transport.base import TrainTask
from dpeft.transport.messages import (
    CoordinatorStatus,
    FetchAsk,
    HeartbeatAnswer,
    JoinAnswer,
    PollAnswer,
    PollAsk,
    SessionCall,
    UpdateHeader,
    UploadProgress,
    UploadQueryAsk,
    UploadVerdict,
    WorkerJoin,
    WorkerState,
)

MAX_JSON_BYTES = 64 * 1024


def _json_object(text: str, what: str) -> dict[str, Any]:
    if len(text) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{what} is not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


# -- tasks ---------------------------------------------------------------------------
def task_to_proto(task: TrainTask) -> pb.TrainTask:
    return pb.TrainTask(
        task_id=task.task_id,
        round=task.round,
        client_id=task.client_id,
        blob_id=task.blob_id,
        blob_size=task.blob_size,
        blob_sha256=task.blob_sha256,
        hyperparams_json=json.dumps(task.hyperparams, sort_keys=True),
        blob_crc32=task.blob_crc32,
        blob_crc32c=task.blob_crc32c,
        kind=task.kind,
    )


def task_from_proto(msg: pb.TrainTask) -> TrainTask:
    if msg.blob_size < 0:
        raise ProtocolError("task blob_size is negative")
    return TrainTask(
        task_id=msg.task_id,
        round=msg.round,
        client_id=msg.client_id,
        blob_id=msg.blob_id,
        blob_size=msg.blob_size,
        blob_sha256=bytes(msg.blob_sha256),
        hyperparams=_json_object(msg.hyperparams_json, "task hyperparameters"),
        blob_crc32=msg.blob_crc32 if msg.HasField("blob_crc32") else None,
        blob_crc32c=msg.blob_crc32c if msg.HasField("blob_crc32c") else None,
        kind=_task_kind(msg.kind),
    )


def _task_kind(kind: str) -> str:
    if len(kind) > 64:
        raise ProtocolError("task kind longer than 64 characters")
    return "" if kind == "train" else kind


# -- join / heartbeat / leave --------------------------------------------------------------
def join_to_proto(join: WorkerJoin) -> pb.JoinRequest:
    return pb.JoinRequest(
        worker_id=join.worker_id, token=join.token, own_data=join.own_data, own_examples=join.own_examples, task_kinds=join.task_kinds
    )


def join_from_proto(msg: pb.JoinRequest) -> WorkerJoin:
    if not msg.worker_id or len(msg.worker_id) > 128:
        raise ProtocolError("worker_id must be 1..128 characters")
    if len(msg.task_kinds) > 16 or any(len(k) > 64 for k in msg.task_kinds):
        raise ProtocolError("task_kinds: at most 16 kinds of at most 64 characters")
    return WorkerJoin(
        worker_id=msg.worker_id,
        token=msg.token,
        own_data=bool(msg.own_data),
        own_examples=int(msg.own_examples),
        task_kinds=sorted(set(msg.task_kinds)),
    )


def join_answer_to_proto(answer: JoinAnswer) -> pb.JoinReply:
    return pb.JoinReply(
        run_id=answer.run_id, session=answer.session, config_yaml=answer.config_yaml, client_ids=answer.client_ids, heartbeat_s=answer.heartbeat_s
    )


def join_answer_from_proto(msg: pb.JoinReply) -> JoinAnswer:
    return JoinAnswer(run_id=msg.run_id, session=msg.session, config_yaml=msg.config_yaml, client_ids=list(msg.client_ids), heartbeat_s=msg.heartbeat_s)


def heartbeat_to_proto(call: SessionCall) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(worker_id=call.worker_id, session=call.session)


def heartbeat_from_proto(msg: pb.HeartbeatRequest) -> SessionCall:
    return SessionCall(worker_id=msg.worker_id, session=msg.session)


def heartbeat_answer_to_proto(answer: HeartbeatAnswer) -> pb.HeartbeatReply:
    return pb.HeartbeatReply(stop=answer.stop, round=answer.round)


def heartbeat_answer_from_proto(msg: pb.HeartbeatReply) -> HeartbeatAnswer:
    return HeartbeatAnswer(stop=msg.stop, round=msg.round)


def leave_to_proto(call: SessionCall) -> pb.LeaveRequest:
    return pb.LeaveRequest(worker_id=call.worker_id, session=call.session)


def leave_from_proto(msg: pb.LeaveRequest) -> SessionCall:
    return SessionCall(worker_id=msg.worker_id, session=msg.session)


def leave_answer_to_proto() -> pb.LeaveReply:
    return pb.LeaveReply()


# -- polling and fetching -----------------------------------------------------------------
def poll_to_proto(ask: PollAsk) -> pb.PollRequest:
    return pb.PollRequest(worker_id=ask.worker_id, session=ask.session, max_tasks=ask.max_tasks)


def poll_from_proto(msg: pb.PollRequest) -> PollAsk:
    return PollAsk(worker_id=msg.worker_id, session=msg.session, max_tasks=msg.max_tasks)


def poll_answer_to_proto(answer: PollAnswer) -> pb.PollReply:
    if answer.stop_reason is not None:
        return pb.PollReply(stop_reason=answer.stop_reason)
    if answer.tasks:
        wire = [task_to_proto(t) for t in answer.tasks]
        return pb.PollReply(task=wire[0], more_tasks=wire[1:])
    return pb.PollReply(wait_s=answer.wait_s)


def poll_answer_from_proto(msg: pb.PollReply) -> PollAnswer:
    kind = msg.WhichOneof("kind")
    if kind == "task":
        return PollAnswer(tasks=[task_from_proto(t) for t in [msg.task, *msg.more_tasks]])
    if kind == "stop_reason":
        return PollAnswer(stop_reason=msg.stop_reason or "stopped")
    return PollAnswer(wait_s=float(msg.wait_s))


def fetch_to_proto(ask: FetchAsk) -> pb.FetchRequest:
    return pb.FetchRequest(worker_id=ask.worker_id, session=ask.session, blob_id=ask.blob_id, offset=ask.offset, crc32c=ask.crc32c)


def fetch_from_proto(msg: pb.FetchRequest) -> FetchAsk:
    return FetchAsk(worker_id=msg.worker_id, session=msg.session, blob_id=msg.blob_id, offset=msg.offset, crc32c=bool(msg.crc32c))


# -- uploads ---------------------------------------------------------------------------------
def update_header_to_proto(header: UpdateHeader) -> pb.UpdateChunk:
    """An upload's first message (``UpdateChunk{header}``)."""
    return pb.UpdateChunk(
        header=pb.UpdateHeader(
            crc32=header.crc32,
            crc32c=header.crc32c,
            offset=header.offset,
            worker_id=header.worker_id,
            session=header.session,
            task_id=header.task_id,
            client_id=header.client_id,
            num_examples=header.num_examples,
            metrics={k: float(v) for k, v in header.metrics.items()},
            size=header.size,
            sha256=header.sha256,
        )
    )


def update_header_from_proto(msg: pb.UpdateChunk | pb.UpdateHeader | Any) -> UpdateHeader:
    """The header an upload starts with (ProtocolError for anything else, or a header out of bounds)."""
    if isinstance(msg, pb.UpdateChunk):
        if msg.WhichOneof("part") != "header":
            raise ProtocolError("an upload must start with its header")
        msg = msg.header
    if not isinstance(msg, pb.UpdateHeader):
        raise ProtocolError("an upload must start with its header")
    if msg.num_examples < 0:
        raise ProtocolError("num_examples is negative")
    if msg.size < 0:
        raise ProtocolError("update size is negative")
    if not 0 <= msg.offset <= msg.size:
        raise ProtocolError(f"resume offset {msg.offset} outside 0..{msg.size}")
    if len(msg.metrics) > 256:
        raise ProtocolError("too many metrics")
    if len(msg.task_id) > 256 or len(msg.worker_id) > 128:
        raise ProtocolError("task_id or worker_id too long")
    if msg.HasField("crc32") and msg.HasField("crc32c"):
        raise ProtocolError("set one of crc32 and crc32c, not both")
    if len(msg.sha256) != 32 and not (len(msg.sha256) == 0 and (msg.HasField("crc32") or msg.HasField("crc32c"))):
        raise ProtocolError("sha256 must be 32 bytes (or empty, with the payload's crc32c or crc32)")
    if not all(math.isfinite(v) for v in msg.metrics.values()):
        raise ProtocolError("metrics must be finite numbers")
    return UpdateHeader(
        worker_id=msg.worker_id,
        session=msg.session,
        task_id=msg.task_id,
        client_id=msg.client_id,
        num_examples=msg.num_examples,
        metrics=dict(msg.metrics),
        size=msg.size,
        sha256=bytes(msg.sha256),
        offset=msg.offset,
        crc32=msg.crc32 if msg.HasField("crc32") else None,
        crc32c=msg.crc32c if msg.HasField("crc32c") else None,
    )


def upload_verdict_to_proto(verdict: UploadVerdict) -> pb.UpdateAck:
    return pb.UpdateAck(accepted=verdict.accepted, reason=verdict.reason, received=verdict.received)


def upload_verdict_from_proto(msg: pb.UpdateAck) -> UploadVerdict:
    return UploadVerdict(accepted=bool(msg.accepted), reason=msg.reason, received=int(msg.received))


def upload_query_to_proto(ask: UploadQueryAsk) -> pb.UploadQuery:
    return pb.UploadQuery(worker_id=ask.worker_id, session=ask.session, task_id=ask.task_id)


def upload_query_from_proto(msg: pb.UploadQuery) -> UploadQueryAsk:
    return UploadQueryAsk(worker_id=msg.worker_id, session=msg.session, task_id=msg.task_id)


def upload_progress_to_proto(progress: UploadProgress) -> pb.UploadStatus:
    return pb.UploadStatus(received=progress.received, size=progress.size)


def upload_progress_from_proto(msg: pb.UploadStatus) -> UploadProgress:
    return UploadProgress(received=int(msg.received), size=int(msg.size))


# -- status -------------------------------------------------------------------------------------
def status_request_to_proto() -> pb.StatusRequest:
    return pb.StatusRequest()


def status_to_proto(status: CoordinatorStatus) -> pb.StatusReply:
    workers = [
        pb.WorkerStatus(
            worker_id=w.worker_id,
            state=w.state,
            last_seen=w.last_seen,
            tasks_done=w.tasks_done,
            bytes_up=w.bytes_up,
            bytes_down=w.bytes_down,
            own_data=w.own_data,
            client_ids=w.client_ids,
            current_task=w.current_task,
            address=w.address,
        )
        for w in status.workers
    ]
    return pb.StatusReply(
        run_id=status.run_id,
        round=status.round,
        total_rounds=status.total_rounds,
        tasks_submitted=status.tasks_submitted,
        tasks_done=status.tasks_done,
        tasks_pending=status.tasks_pending,
        tasks_inflight=status.tasks_inflight,
        uploads_partial=status.uploads_partial,
        bytes_up=status.bytes_up,
        bytes_down=status.bytes_down,
        stop_reason=status.stop_reason,
        workers=workers,
        uptime_s=status.uptime_s,
        rejected=status.rejected,
    )


def status_from_proto(msg: pb.StatusReply) -> CoordinatorStatus:
    return CoordinatorStatus(
        run_id=msg.run_id,
        round=msg.round,
        total_rounds=msg.total_rounds,
        tasks_submitted=msg.tasks_submitted,
        tasks_done=msg.tasks_done,
        tasks_pending=msg.tasks_pending,
        tasks_inflight=msg.tasks_inflight,
        uploads_partial=msg.uploads_partial,
        bytes_up=msg.bytes_up,
        bytes_down=msg.bytes_down,
        rejected=msg.rejected,
        stop_reason=msg.stop_reason,
        uptime_s=msg.uptime_s,
        workers=[
            WorkerState(
                worker_id=w.worker_id,
                state=w.state,
                last_seen=w.last_seen,
                tasks_done=w.tasks_done,
                bytes_up=w.bytes_up,
                bytes_down=w.bytes_down,
                own_data=w.own_data,
                client_ids=list(w.client_ids),
                current_task=w.current_task,
                address=w.address,
            )
            for w in msg.workers
        ],
    )


def config_from_text(text: str) -> dict[str, Any]:
    """The run config a worker receives (YAML parsed with the safe loader: data only)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProtocolError(f"run config from the coordinator is not YAML: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("run config from the coordinator must be a mapping")
    return value
