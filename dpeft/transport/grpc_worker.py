"""gRPC worker connection: dials the coordinator, polls tasks, streams payloads both ways."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import Any, Callable, Iterator, TypeVar

import grpc

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft._proto.dpeft.v1 import coordinator_pb2_grpc as pb_grpc
from dpeft.errors import ProtocolError
from dpeft.transport import serde
from dpeft.transport.base import TrainTask, WorkerConnection, WorkerRegistration
from dpeft.transport.grpc_server import channel_options

log = logging.getLogger("dpeft.transport.grpc")
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class CoordinatorGone(ConnectionError):
    """The coordinator could not be reached for longer than the worker's patience."""


class GrpcWorkerConnection(WorkerConnection):
    """One worker's channel to the coordinator."""

    def __init__(self, address: str, token: str = "", chunk_bytes: int = 4 << 20, patience_s: float = 60.0) -> None:
        self.address = address
        self.token = token
        self.chunk_bytes = chunk_bytes
        self.patience_s = patience_s
        self.channel = grpc.insecure_channel(address, options=channel_options(chunk_bytes))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.worker_id = ""
        self.session = ""
        self._cache: tuple[str, bytes] | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    def _retry(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it succeeds, backing off with jitter on transient errors."""
        start = time.time()
        delay = 0.1
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                if time.time() - start > self.patience_s:
                    raise CoordinatorGone(f"coordinator at {self.address} unreachable for {self.patience_s:.0f}s") from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        self.worker_id = worker_id
        req = pb.JoinRequest(worker_id=worker_id, token=self.token, own_data=own_examples is not None, own_examples=own_examples or 0)
        reply = self._retry(lambda: self.stub.Join(req, timeout=10, wait_for_ready=True))
        self.session = reply.session
        return WorkerRegistration(
            run_id=reply.run_id,
            session=reply.session,
            config=serde.config_from_text(reply.config_yaml),
            client_ids=list(reply.client_ids),
            heartbeat_s=reply.heartbeat_s,
        )

    def poll(self) -> TrainTask | float | str:
        req = pb.PollRequest(worker_id=self.worker_id, session=self.session)
        reply = self._retry(lambda: self.stub.PollTask(req, timeout=30))
        kind = reply.WhichOneof("kind")
        if kind == "task":
            return serde.task_from_proto(reply.task)
        if kind == "stop_reason":
            return reply.stop_reason or "stopped"
        return float(reply.wait_s)

    def fetch(self, task: TrainTask) -> bytes:
        if self._cache is not None and self._cache[0] == task.blob_id:
            return self._cache[1]
        buf = bytearray()
        attempts = 0
        while len(buf) < task.blob_size:
            req = pb.FetchRequest(worker_id=self.worker_id, session=self.session, blob_id=task.blob_id, offset=len(buf))
            try:
                for chunk in self.stub.FetchBlob(req, timeout=600):
                    if chunk.offset != len(buf) or len(buf) + len(chunk.data) > task.blob_size:
                        raise ProtocolError("payload chunk out of order or beyond the declared size")
                    buf += chunk.data
                    self.bytes_down += len(chunk.data)
            except grpc.RpcError as exc:
                attempts += 1
                if exc.code() not in _RETRYABLE or attempts > 5:
                    raise
                time.sleep(0.2 * attempts)
                continue  # resume from len(buf)
            if len(buf) < task.blob_size:
                raise ProtocolError(f"payload ended at {len(buf)} of {task.blob_size} bytes")
        if hashlib.sha256(buf).digest() != task.blob_sha256:
            raise ProtocolError("payload checksum mismatch")
        data = bytes(buf)
        self._cache = (task.blob_id, data)
        return data

    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        header = serde.update_header_to_proto(
            self.worker_id, self.session, task, num_examples, metrics, len(payload), hashlib.sha256(payload).digest()
        )

        def chunks() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for start in range(0, len(payload), self.chunk_bytes):
                yield pb.UpdateChunk(data=payload[start : start + self.chunk_bytes])

        try:
            ack = self._retry(lambda: self.stub.PushUpdate(chunks(), timeout=600))
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                return False, exc.details() or exc.code().name
            raise
        self.bytes_up += len(payload)
        return bool(ack.accepted), ack.reason

    def heartbeat(self) -> dict[str, Any]:
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id, session=self.session), timeout=10)
        return {"stop": reply.stop, "round": reply.round}

    def leave(self) -> None:
        try:
            self.stub.Leave(pb.LeaveRequest(worker_id=self.worker_id, session=self.session), timeout=5)
        except grpc.RpcError:
            pass
        self.channel.close()
