"""gRPC coordinator transport: a thin servicer over queues; workers dial in.

The servicer holds no aggregation logic. It keeps the task queue and the published payloads,
streams payload chunks, and feeds upload chunks into a validating decoder supplied by the
round engine (so nothing is allocated before the header matches the adapter schema).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent import futures
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft._proto.dpeft.v1 import coordinator_pb2_grpc as pb_grpc
from dpeft.errors import ProtocolError, RejectedUpdate
from dpeft.transport import serde
from dpeft.transport.base import CoordinatorTransport, DecoderFactory, Event, Rejection, TaskResult, TrainTask

log = logging.getLogger("dpeft.transport.grpc")

SERVICE_NAME = "dpeft.v1.Coordinator"


def channel_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """gRPC options sized so one chunk plus framing always fits in a message."""
    limit = chunk_bytes + (1 << 20)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class _Servicer(pb_grpc.CoordinatorServicer):
    def __init__(self, owner: "GrpcCoordinatorTransport") -> None:
        self.o = owner

    # -- helpers -----------------------------------------------------------
    def _worker(self, worker_id: str, session: str, context: grpc.ServicerContext) -> dict[str, Any]:
        info = self.o._workers.get(worker_id)
        if info is None or info["session"] != session:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unknown worker {worker_id!r} or stale session; join first")
        info["last_seen"] = time.time()
        info["alive"] = True
        return info

    # -- RPCs ---------------------------------------------------------------
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not request.worker_id or len(request.worker_id) > 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id must be 1..128 characters")
        if not self.o.authenticate(request.worker_id, request.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token for this worker id")
        with self.o._lock:
            prev = self.o._workers.get(request.worker_id)
            clients = list(prev["client_ids"]) if prev else []
            if request.own_data and not clients:
                claimed = {c for w in self.o._workers.values() for c in w["client_ids"]}
                free = [c for c in range(self.o.num_clients) if c not in claimed]
                if not free:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.o.num_clients} client slots are taken")
                clients = [free[0]]
            session = secrets.token_hex(8)
            self.o._workers[request.worker_id] = {
                "session": session,
                "own_data": bool(request.own_data),
                "own_examples": int(request.own_examples),
                "client_ids": clients,
                "joined": time.time(),
                "last_seen": time.time(),
                "alive": True,
                "left": False,
                "tasks_done": 0,
                "bytes_up": 0,
                "bytes_down": 0,
            }
            self.o._cond.notify_all()
        log.info("worker joined id=%s own_data=%s clients=%s", request.worker_id, request.own_data, clients)
        return pb.JoinReply(
            run_id=self.o.run_id, session=session, config_yaml=self.o.config_yaml, client_ids=clients, heartbeat_s=self.o.heartbeat_s
        )

    def PollTask(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        info = self._worker(request.worker_id, request.session, context)
        deadline = time.time() + self.o.poll_timeout_s
        with self.o._cond:
            while True:
                if self.o._stop_reason is not None:
                    return pb.PollReply(stop_reason=self.o._stop_reason)
                task = self.o._take_task(request.worker_id, info)
                if task is not None:
                    return pb.PollReply(task=serde.task_to_proto(task))
                left = deadline - time.time()
                if left <= 0 or not context.is_active():
                    return pb.PollReply(wait_s=0.05)
                self.o._cond.wait(min(left, 0.5))

    def FetchBlob(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.BlobChunk]:
        info = self._worker(request.worker_id, request.session, context)
        blob = self.o._blobs.get(request.blob_id)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no payload {request.blob_id!r} (round already closed?)")
        if not 0 <= request.offset <= len(blob):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{len(blob)}")
        step = self.o.chunk_bytes
        for start in range(request.offset, len(blob), step):
            data = blob[start : start + step]
            self.o._count(down=len(data), info=info)
            yield pb.BlobChunk(offset=start, data=data)

    def PushUpdate(self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext) -> pb.UpdateAck:
        header = None
        worker_id, task_id = "?", "?"
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise RejectedUpdate("malformed", "an upload must start with its header")
            header = serde.update_header_from_proto(first.header)
            worker_id, task_id = header["worker_id"], header["task_id"]
            info = self._worker(worker_id, header["session"], context)
            if header["size"] > self.o.max_update_bytes:
                raise RejectedUpdate("too_large", f"{header['size']} bytes exceeds the limit of {self.o.max_update_bytes}")
            decoder = self.o.decoder_factory(task_id, header["client_id"])
            digest = hashlib.sha256()
            received = 0
            for chunk in request_iterator:
                if chunk.WhichOneof("part") != "data":
                    raise RejectedUpdate("malformed", "a second header inside one upload")
                received += len(chunk.data)
                if received > header["size"]:
                    raise RejectedUpdate("malformed", f"more than the declared {header['size']} bytes")
                digest.update(chunk.data)
                decoder.feed(chunk.data)
            if received != header["size"]:
                raise RejectedUpdate("truncated", f"received {received} of {header['size']} bytes")
            if digest.digest() != header["sha256"]:
                raise RejectedUpdate("checksum", "sha256 of the received bytes does not match the header")
            state = decoder.finish()
        except ProtocolError as exc:
            return self._reject(context, worker_id, task_id, RejectedUpdate("malformed", str(exc)))
        except RejectedUpdate as exc:
            return self._reject(context, worker_id, task_id, exc)
        self.o._count(up=received, info=info)
        with self.o._lock:
            self.o._inflight.pop(task_id, None)
            info["tasks_done"] += 1
        self.o._events.put(
            TaskResult(
                task_id=task_id,
                client_id=header["client_id"],
                worker_id=worker_id,
                delta=state,
                num_examples=header["num_examples"],
                metrics=header["metrics"],
                bytes_up=received,
            )
        )
        return pb.UpdateAck(accepted=True, received=received)

    def _reject(self, context: grpc.ServicerContext, worker_id: str, task_id: str, exc: RejectedUpdate) -> pb.UpdateAck:
        log.warning("rejected update worker=%s task=%s: %s", worker_id, task_id, exc)
        self.o._events.put(Rejection(task_id=task_id, worker_id=worker_id, reason=exc.reason, detail=str(exc)))
        code = grpc.StatusCode.FAILED_PRECONDITION if exc.reason in ("unknown_task", "stale", "duplicate") else grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self._worker(request.worker_id, request.session, context)
        return pb.HeartbeatReply(stop=self.o._stop_reason is not None, round=self.o.current_round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        info = self._worker(request.worker_id, request.session, context)
        info["left"] = True
        info["alive"] = False
        with self.o._cond:
            self.o._cond.notify_all()
        return pb.LeaveReply()


class GrpcCoordinatorTransport(CoordinatorTransport):
    """Serves the Coordinator service and the standard gRPC health service."""

    def __init__(
        self,
        listen: str,
        *,
        run_id: str,
        config_yaml: str,
        num_clients: int,
        decoder_factory: DecoderFactory,
        chunk_bytes: int = 4 << 20,
        max_update_bytes: int = 1 << 31,
        poll_timeout_s: float = 2.0,
        heartbeat_s: float = 5.0,
        authenticate: Callable[[str, str], bool] | None = None,
        max_threads: int = 64,
    ) -> None:
        self.listen = listen
        self.run_id = run_id
        self.config_yaml = config_yaml
        self.num_clients = num_clients
        self.decoder_factory = decoder_factory
        self.chunk_bytes = chunk_bytes
        self.max_update_bytes = max_update_bytes
        self.poll_timeout_s = poll_timeout_s
        self.heartbeat_s = heartbeat_s
        self.authenticate = authenticate or (lambda worker_id, token: True)
        self.current_round = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._workers: dict[str, dict[str, Any]] = {}
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._pending: deque[TrainTask] = deque()
        self._pinned: dict[int, str] = {}
        self._inflight: dict[str, tuple[str, TrainTask, float]] = {}
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop_reason: str | None = None
        self._bytes_up = 0
        self._bytes_down = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads), options=channel_options(chunk_bytes))
        pb_grpc.add_CoordinatorServicer_to_server(_Servicer(self), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> str:
        self.port = self._server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        self._server.start()
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        with self._cond:
            self._stop_reason = reason
            self._cond.notify_all()
        deadline = time.time() + grace_s
        while time.time() < deadline and any(w["alive"] and not w["left"] for w in self._workers.values()):
            time.sleep(0.05)
        self._health.enter_graceful_shutdown()
        self._server.stop(grace=0.5).wait()

    # -- engine-facing ---------------------------------------------------------
    def publish_blob(self, blob_id: str, payload: bytes) -> None:
        with self._lock:
            self._blobs[blob_id] = payload
            while len(self._blobs) > 2:
                self._blobs.popitem(last=False)

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        with self._cond:
            self._pinned = dict(pinned)
            self._pending.extend(tasks)
            self._cond.notify_all()

    def _take_task(self, worker_id: str, info: dict[str, Any]) -> TrainTask | None:
        for i, task in enumerate(self._pending):
            owner = self._pinned.get(task.client_id)
            if owner == worker_id or (owner is None and not info["own_data"]):
                del self._pending[i]
                self._inflight[task.task_id] = (worker_id, task, time.time())
                return task
        return None

    def next_event(self, timeout: float) -> Event | None:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def cancel_pending(self) -> list[str]:
        with self._lock:
            ids = [t.task_id for t in self._pending]
            self._pending.clear()
            self._inflight.clear()
            return ids

    def workers(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v, session="") for k, v in self._workers.items()}

    def bytes_moved(self) -> tuple[int, int]:
        with self._lock:
            return self._bytes_up, self._bytes_down

    def _count(self, up: int = 0, down: int = 0, info: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._bytes_up += up
            self._bytes_down += down
            if info is not None:
                info["bytes_up"] += up
                info["bytes_down"] += down
