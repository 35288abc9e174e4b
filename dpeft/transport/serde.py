"""The one place where protobuf messages are converted to and from dpeft's dataclasses."""

from __future__ import annotations

import json
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
    worker_id: str, session: str, task: TrainTask, num_examples: int, metrics: dict[str, float], size: int, sha256: bytes
) -> pb.UpdateHeader:
    return pb.UpdateHeader(
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
    if len(msg.metrics) > 256:
        raise ProtocolError("too many metrics")
    return {
        "worker_id": msg.worker_id,
        "session": msg.session,
        "task_id": msg.task_id,
        "client_id": msg.client_id,
        "num_examples": msg.num_examples,
        "metrics": dict(msg.metrics),
        "size": msg.size,
        "sha256": bytes(msg.sha256),
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
