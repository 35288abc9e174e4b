"""The one place where protobuf messages are converted to and from dpeft's dataclasses."""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.errors import ProtocolError
from dpeft.transport.base import TrainTask

MAX_JSON_BYTES = 64 * 1024


def task_to_proto(task: TrainTask) -> pb.TrainTask:
    return pb.TrainTask(
        task_id=task.task_id,
        round=task.round,
        client_id=task.client_id,
        blob_id=task.blob_id,
        blob_size=task.blob_size,
        blob_sha256=task.blob_sha256,
        hyperparams_json=json.dumps(task.hyperparams, sort_keys=True),
    )


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
    )


def update_header_to_proto(
    worker_id: str, session: str, task: TrainTask, num_examples: int, metrics: dict[str, float], size: int, sha256: bytes, offset: int = 0
) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        offset=offset,
        worker_id=worker_id,
        session=session,
        task_id=task.task_id,
        client_id=task.client_id,
        num_examples=num_examples,
        metrics={k: float(v) for k, v in metrics.items()},
        size=size,
        sha256=sha256,
    )


def update_header_from_proto(msg: pb.UpdateHeader) -> dict[str, Any]:
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
    if len(msg.sha256) != 32:
        raise ProtocolError("sha256 must be 32 bytes")
    if not all(math.isfinite(v) for v in msg.metrics.values()):
        raise ProtocolError("metrics must be finite numbers")
    return {
        "worker_id": msg.worker_id,
        "session": msg.session,
        "task_id": msg.task_id,
        "client_id": msg.client_id,
        "num_examples": msg.num_examples,
        "metrics": dict(msg.metrics),
        "size": msg.size,
        "sha256": bytes(msg.sha256),
        "offset": msg.offset,
    }


def data_chunk_to_proto(offset: int, data: bytes) -> pb.UpdateChunk:
    """One upload chunk with its offset and CRC-32."""
    return pb.UpdateChunk(chunk=pb.DataChunk(offset=offset, data=data, crc32=zlib.crc32(data)))


def data_chunk_from_proto(msg: pb.UpdateChunk, expected_offset: int) -> tuple[bytes, bool]:
    """(bytes, crc_ok) of a data piece; raises ProtocolError for a header or a misplaced chunk.

    Legacy ``data`` pieces carry no checksum (crc_ok is True)."""
    kind = msg.WhichOneof("part")
    if kind == "data":
        return msg.data, True
    if kind != "chunk":
        raise ProtocolError("a second header inside one upload" if kind == "header" else "an empty upload message")
    if msg.chunk.offset != expected_offset:
        raise ProtocolError(f"chunk at offset {msg.chunk.offset}, expected {expected_offset}")
    data = msg.chunk.data
    return data, zlib.crc32(data) == msg.chunk.crc32


def status_to_dict(msg: pb.StatusReply) -> dict[str, Any]:
    """A StatusReply as plain data (for `dpeft status`)."""
    return {
        "run_id": msg.run_id,
        "round": msg.round,
        "total_rounds": msg.total_rounds,
        "tasks_submitted": msg.tasks_submitted,
        "tasks_done": msg.tasks_done,
        "tasks_pending": msg.tasks_pending,
        "tasks_inflight": msg.tasks_inflight,
        "uploads_partial": msg.uploads_partial,
        "bytes_up": msg.bytes_up,
        "bytes_down": msg.bytes_down,
        "rejected": msg.rejected,
        "stop_reason": msg.stop_reason,
        "uptime_s": msg.uptime_s,
        "workers": [
            {
                "worker_id": w.worker_id,
                "state": w.state,
                "last_seen": w.last_seen,
                "tasks_done": w.tasks_done,
                "bytes_up": w.bytes_up,
                "bytes_down": w.bytes_down,
                "own_data": w.own_data,
                "client_ids": list(w.client_ids),
                "current_task": w.current_task,
                "address": w.address,
            }
            for w in msg.workers
        ],
    }


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
