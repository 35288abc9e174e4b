"""gRPC coordinator transport: a thin servicer over queues; workers dial in.

The servicer holds no aggregation logic. It keeps the task queue, the published payloads and
the worker registry, streams payload chunks, and feeds upload chunks into a validating decoder
supplied by the round engine (so nothing is allocated before the header matches the adapter
schema). On top of that it is what faces the network:

- authentication: with a :class:`~dpeft.transport.auth.TokenStore`, every call must carry a
  (worker id, bearer token) pair in its metadata; an interceptor refuses bad ones with
  UNAUTHENTICATED before the handler runs, and the handler checks that the worker id in the
  request is the one the token was issued for (PERMISSION_DENIED otherwise). TLS (optionally
  mutual) through server credentials.
- limits: declared update size, bytes per tensor, concurrent uploads (a partial upload holds at
  most its schema-checked size; the oldest idle one is evicted when the limit is reached).
- liveness: a worker not seen for ``dead_after_s`` is marked dead and its in-flight tasks go
  back to the front of the queue (another worker takes them); a worker that comes back is alive
  again. Workers that do nothing else send Heartbeat.
- resumable uploads: an upload that breaks off keeps its verified prefix (per-chunk CRC,
  running whole-payload CRC or sha256) keyed by task id for ``resume_window_s``; ``QueryUpload`` tells the worker
  where to continue, and a corrupted chunk is refused with DATA_LOSS and re-sent.
- wire integrity: CRC-32C (Castagnoli, hardware-computed by the ``crc32c`` package) per chunk
  and for the whole payload (combined from the chunk CRCs, :mod:`dpeft.codec.crc`). How a worker
  learns the coordinator speaks it: every task this coordinator hands out carries
  ``TrainTask.blob_crc32c`` (the published payload's CRC-32C, computed once at
  :meth:`~GrpcCoordinatorTransport.publish_blob`); a worker that sees it asks for CRC-32C chunks
  (``FetchRequest.crc32c``) and uploads with ``UpdateHeader.crc32c`` / ``DataChunk.crc32c``. No
  separate handshake: the task a worker answers is itself the proof, and a task from an older
  coordinator (no ``blob_crc32c``) keeps the worker on CRC-32 (zlib) both ways. Older workers are
  still served: a fetch without ``crc32c`` gets ``BlobChunk.crc32`` (zlib), and uploads with
  ``crc32`` or ``sha256`` headers are checked as before. The two algorithms travel in separate
  fields and an upload uses its header's algorithm for every chunk, so a CRC-32 value is never
  compared with a CRC-32C one.
- a round's global is published once and downloaded by every worker, so per-download work is
  done at publish instead: the chunk CRCs are computed once (CRC-32C at publish, CRC-32 for older
  workers on their first fetch) and an in-memory payload is kept as its ready-made response
  frames (:class:`FramedBlob`), so a current worker's download costs the coordinator no copy of
  its own and no checksum. Chunks are cut on a fixed grid of ``chunk_bytes`` (a download resuming
  off the grid gets one short chunk first).
- bounded memory for large adapters: the engine's decoder spools a large upload's data to an
  unlinked temp file as chunks arrive (:mod:`dpeft.codec.spool`), and a published payload may
  be a :class:`~dpeft.codec.spool.SpooledBlob` served chunk by chunk from its file; the update
  is checked (finite values, global L2 norm against ``max_update_norm``) tensor by tensor
  before it is acknowledged.
- bad updates: every rejection is a precise gRPC status + message, logged as one structured
  line, and reported to the engine as a :class:`Rejection` (counted in metrics.jsonl); nothing
  reaches the aggregate.
- restarts: the registry of workers (their client ids) is kept in ``registry_path`` so a
  restarted coordinator hands every worker the same clients; sessions are per process, so a
  worker calling with an old session gets ABORTED ("join again") and re-joins by itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft._proto.dpeft.v1 import coordinator_pb2_grpc as pb_grpc
from dpeft.codec.crc import CRC32, CRC32C, CrcAlgorithm, chunk_crcs, combine_chunks, crc32_combine
from dpeft.codec.spool import SpooledBlob
from dpeft.codec.tensors import StateDecoder
from dpeft.errors import ProtocolError, RejectedUpdate
from dpeft.rounds.validation import check_norm, check_update
from dpeft.transport import serde
from dpeft.transport.auth import AuthInterceptor, TokenStore, metadata_identity
from dpeft.transport.base import (
    Blob,
    CoordinatorTransport,
    DecoderFactory,
    Event,
    Rejection,
    TaskResult,
    TrainTask,
)

log = logging.getLogger("dpeft.transport.grpc")
events_log = logging.getLogger("dpeft.events")

SERVICE_NAME = "dpeft.v1.Coordinator"

#: rejection reason -> gRPC status code (everything else: INVALID_ARGUMENT)
_REASON_CODES = {
    "unknown_task": grpc.StatusCode.FAILED_PRECONDITION,
    "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "late": grpc.StatusCode.FAILED_PRECONDITION,
    "too_stale": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_client": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}


class FramedBlob:
    """An in-memory payload kept as the FetchBlob responses that carry it: one BlobChunk frame
    (wire bytes, with its CRC-32C) per ``step`` bytes, built once when the payload is published.
    A current worker's download of a chunk on the grid is that frame, handed to gRPC as is: no
    serialization copy per worker. Memory is the payload's (the caller's copy is not kept);
    :meth:`read` views the data inside the frames."""

    def __init__(self, payload: bytes | memoryview, step: int) -> None:
        view = memoryview(payload).cast("B")
        self.size = len(view)
        self.step = step
        self.crc32c = chunk_crcs(view, step, CRC32C.fn)
        frames = [serde.blob_chunk_frame(serde.BlobPiece(i * step, view[i * step : (i + 1) * step], crc32c=c)) for i, c in enumerate(self.crc32c)]
        self.frames = [f for f, _ in frames]
        self._starts = [start for _, start in frames]

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """``length`` bytes from ``offset`` (fewer at the end): a view when they lie in one chunk."""
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        i = offset // self.step
        if end <= (i + 1) * self.step:
            at = self._starts[i] + offset - i * self.step
            return memoryview(self.frames[i])[at : at + end - offset]
        pieces = []
        while offset < end:
            stop = min(end, (offset // self.step + 1) * self.step)
            pieces.append(self.read(offset, stop - offset))
            offset = stop
        return b"".join(pieces)


def blob_piece(blob: Blob | FramedBlob, start: int, length: int) -> bytes | memoryview:
    """``length`` bytes of a published payload from ``start``: a view of an in-memory payload,
    or one copy read from a spooled one's file."""
    if isinstance(blob, SpooledBlob | FramedBlob):
        return blob.read(start, length)
    return memoryview(blob)[start : start + length]


def add_servicer(servicer: pb_grpc.CoordinatorServicer, server: grpc.Server) -> None:
    """Register the Coordinator service like the generated ``add_CoordinatorServicer_to_server``,
    except that the bulk streams (FetchBlob responses, PushUpdate requests) use serde's zero-copy
    (de)serializers; the bytes on the wire are the same protobuf messages."""
    unary = {
        "Join": (pb.JoinRequest, pb.JoinReply),
        "PollTask": (pb.PollRequest, pb.PollReply),
        "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
        "Leave": (pb.LeaveRequest, pb.LeaveReply),
        "QueryUpload": (pb.UploadQuery, pb.UploadStatus),
        "Status": (pb.StatusRequest, pb.StatusReply),
    }
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
        for name, (req, resp) in unary.items()
    }
    handlers["FetchBlob"] = grpc.unary_stream_rpc_method_handler(
        servicer.FetchBlob, request_deserializer=pb.FetchRequest.FromString, response_serializer=serde.encode_blob_chunk
    )
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushUpdate, request_deserializer=serde.decode_update_part, response_serializer=pb.UpdateAck.SerializeToString
    )
    missing = {m.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods} - set(handlers)
    if missing:  # pragma: no cover - a new RPC in the proto must be added above
        raise RuntimeError(f"add_servicer does not register {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured ``event=NAME key=value ...`` line (values with spaces are JSON-quoted)."""
    if not events_log.isEnabledFor(level):
        return
    parts = [f"event={event}"]
    for k, v in fields.items():
        if isinstance(v, float):
            text = f"{v:.3f}"
        else:
            text = str(v)
            if not text or any(c.isspace() or c in "\"=" for c in text):
                text = json.dumps(text)
        parts.append(f"{k}={text}")
    events_log.log(level, " ".join(parts))


def channel_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """gRPC options sized so one chunk plus framing always fits in a message."""
    limit = chunk_bytes + (1 << 20)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a client's reconnect backoff grows 1.6x per refused attempt and would reach minutes,
        # longer than a worker's --patience: a worker started before its coordinator (or across
        # a coordinator restart) dials again at least every 5 s
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


class _ChunkCrcs:
    """The chunk CRCs of one published payload on the grid of ``step`` bytes, computed once and
    shared by every download of it: CRC-32C (and its whole-payload value, for
    ``TrainTask.blob_crc32c``) at publish, CRC-32 (zlib) only when an older worker asks.

    A :class:`FramedBlob` brings its chunk CRC-32Cs (taken when it was framed); a spooled payload
    already carries its whole CRC-32C (computed while it was written), and its chunk CRCs are
    filled in as chunks are first served (the read happens anyway); anything else is scanned
    here. Concurrent fillers write the same values."""

    def __init__(self, blob: Blob | FramedBlob, step: int) -> None:
        self.step = step
        self.size = len(blob)
        n = -(-self.size // step)
        whole = blob.crc32c if isinstance(blob, SpooledBlob) else None
        if isinstance(blob, FramedBlob) and blob.step == step:
            crcs: list[int | None] = list(blob.crc32c)
            whole = self._whole(blob.crc32c)
        elif whole is None:
            if isinstance(blob, SpooledBlob | FramedBlob):  # chunk by chunk (memory stays one chunk)
                crcs = [CRC32C.fn(blob.read(i * step, step)) for i in range(n)]
            else:
                crcs = list(chunk_crcs(blob, step, CRC32C.fn))
            whole = self._whole(crcs)
        else:
            crcs = [None] * n
        self.whole_crc32c: int = whole
        self.by_algo: dict[str, list[int | None]] = {CRC32C.name: crcs}

    def _whole(self, crcs: list[int] | list[int | None]) -> int:
        """The payload's CRC-32C from its chunk CRC-32Cs on the grid."""
        return combine_chunks(((c, min(self.step, self.size - i * self.step)) for i, c in enumerate(crcs)), poly=CRC32C.poly)

    def get(self, algo: CrcAlgorithm, index: int, data: bytes | memoryview) -> int:
        """The ``algo`` CRC of chunk ``index`` (whose bytes are ``data``), computed on first use."""
        crcs = self.by_algo.get(algo.name)
        if crcs is None:
            crcs = self.by_algo.setdefault(algo.name, [None] * len(self.by_algo[CRC32C.name]))
        crc = crcs[index]
        if crc is None:
            crc = crcs[index] = algo.fn(data)
        return crc


@dataclass
class _Upload:
    """The verified prefix of one task's upload (what a resumed upload continues).

    The whole payload is checked against the header's ``crc32c`` or ``crc32`` (the running CRC
    ``crc`` in that algorithm, ``algo``, combined from the verified chunk CRCs: no second pass)
    or, from workers that send one, its ``sha256`` (hashed as chunks arrive)."""

    worker_id: str
    client_id: int
    size: int
    sha256: bytes
    decoder: StateDecoder
    crc32: int | None = None
    crc32c: int | None = None
    crc: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    resumed: int = 0
    updated: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    checked_tensors: bool = False

    @property
    def algo(self) -> CrcAlgorithm:
        """The upload's checksum (every chunk's and the whole payload's): its header's choice."""
        return CRC32C if self.crc32c is not None else CRC32


class _Servicer(pb_grpc.CoordinatorServicer):
    def __init__(self, owner: GrpcCoordinatorTransport) -> None:
        self.o = owner

    # -- helpers -----------------------------------------------------------
    def _identity(self, worker_id: str, context: grpc.ServicerContext) -> None:
        """With tokens, the request's worker id must be the one the token was issued for."""
        if self.o.tokens is None:
            return
        bound, _ = metadata_identity(context.invocation_metadata())
        if bound != worker_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the token is bound to worker {bound!r}, not {worker_id!r}")

    def _worker(self, worker_id: str, session: str, context: grpc.ServicerContext) -> dict[str, Any]:
        self._identity(worker_id, context)
        with self.o._lock:
            info = self.o._workers.get(worker_id)
            if info is None or not info["session"] or info["session"] != session:
                known = info is not None and bool(info["session"])
                msg = "stale session (the worker joined again elsewhere)" if known else "unknown session (coordinator restarted?)"
                context.abort(grpc.StatusCode.ABORTED, f"worker {worker_id!r}: {msg}; join again")
            info["last_seen"] = time.time()
            if not info["alive"] and not info["left"]:
                info["alive"] = True
                log_event("worker_back", worker=worker_id)
                self.o._cond.notify_all()
            return info

    # -- RPCs ---------------------------------------------------------------
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not request.worker_id or len(request.worker_id) > 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id must be 1..128 characters")
        self._identity(request.worker_id, context)
        if self.o.tokens is None and not self.o.authenticate(request.worker_id, request.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token for this worker id")
        with self.o._lock:
            prev = self.o._workers.get(request.worker_id)
            clients = list(prev["client_ids"]) if prev else []
            if request.own_data and not clients:
                claimed = {c for w in self.o._workers.values() for c in w["client_ids"]}
                held = {c for w in self.o._workers.values() if not w["left"] for c in w["client_ids"]}
                # a never-claimed slot first; else one given up by a worker that left (e.g. on bad data)
                free = [c for c in range(self.o.num_clients) if c not in claimed] or [c for c in range(self.o.num_clients) if c not in held]
                if not free:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.o.num_clients} client slots are taken")
                clients = [free[0]]
                for w in self.o._workers.values():
                    if w["left"] and clients[0] in w["client_ids"]:
                        w["client_ids"] = [c for c in w["client_ids"] if c != clients[0]]
            session = secrets.token_hex(8)
            now = time.time()
            self.o._workers[request.worker_id] = {
                "session": session,
                "own_data": bool(request.own_data),
                "own_examples": int(request.own_examples),
                "client_ids": clients,
                "joined": now,
                "last_seen": now,
                "alive": True,
                "left": False,
                "tasks_done": prev["tasks_done"] if prev else 0,
                "bytes_up": prev["bytes_up"] if prev else 0,
                "bytes_down": prev["bytes_down"] if prev else 0,
                "address": context.peer(),
            }
            if prev is None or prev["client_ids"] != clients or prev["own_data"] != bool(request.own_data):
                self.o._save_registry()
            self.o._cond.notify_all()
        log_event("worker_joined", worker=request.worker_id, own_data=bool(request.own_data), clients=clients, peer=context.peer(), rejoin=prev is not None)
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
                tasks = self.o._take_tasks(request.worker_id, info, request.max_tasks)
                if tasks:
                    for task in tasks:
                        log_event("task_assigned", level=logging.DEBUG, worker=request.worker_id, task=task.task_id, round=task.round)
                    wire = [serde.task_to_proto(self.o._with_crc32c(t)) for t in tasks]
                    return pb.PollReply(task=wire[0], more_tasks=wire[1:])
                left = deadline - time.time()
                if left <= 0 or not context.is_active():
                    return pb.PollReply(wait_s=0.05)
                self.o._cond.wait(min(left, 0.5))
                info["last_seen"] = time.time()

    def FetchBlob(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[serde.BlobPiece | bytes]:
        info = self._worker(request.worker_id, request.session, context)
        blob = self.o._blobs.get(request.blob_id)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no payload {request.blob_id!r} (round already closed?)")
        if not 0 <= request.offset <= len(blob):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{len(blob)}")
        crcs = self.o._crcs_of(request.blob_id, blob)
        step = crcs.step
        algo = CRC32C if request.crc32c else CRC32
        start, size = request.offset, len(blob)
        framed = request.crc32c and isinstance(blob, FramedBlob) and blob.step == step
        while start < size:
            end = min(size, (start // step + 1) * step)  # on the grid (a resume off it: one short chunk)
            if framed and start % step == 0:  # the frame made at publish: nothing to copy or hash
                self.o._count(down=end - start, info=info)
                info["last_seen"] = time.time()
                yield blob.frames[start // step]
                start = end
                continue
            data = blob_piece(blob, start, end - start)
            crc = crcs.get(algo, start // step, data) if start % step == 0 else algo.fn(data)
            self.o._count(down=len(data), info=info)
            info["last_seen"] = time.time()  # a long download is a sign of life too
            # serialized by serde.encode_blob_chunk
            yield serde.BlobPiece(start, data, crc32c=crc) if request.crc32c else serde.BlobPiece(start, data, crc32=crc)
            start = end

    def QueryUpload(self, request: pb.UploadQuery, context: grpc.ServicerContext) -> pb.UploadStatus:
        self._worker(request.worker_id, request.session, context)
        with self.o._lock:
            up = self.o._uploads.get(request.task_id)
            if up is None or up.worker_id != request.worker_id:
                return pb.UploadStatus(received=0, size=0)
            return pb.UploadStatus(received=up.received, size=up.size)

    def PushUpdate(self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext) -> pb.UpdateAck:
        o = self.o
        worker_id, task_id = "?", "?"
        try:
            first = next(request_iterator, None)
            if first is None or isinstance(first, serde.DataPiece) or first.WhichOneof("part") != "header":
                raise RejectedUpdate("malformed", "an upload must start with its header")
            try:
                header = serde.update_header_from_proto(first.header)
            except ProtocolError as exc:
                raise RejectedUpdate("malformed", str(exc)) from None
            worker_id, task_id = header["worker_id"], header["task_id"]
            info = self._worker(worker_id, header["session"], context)
            if header["size"] > o.max_update_bytes:
                raise RejectedUpdate("too_large", f"{header['size']} bytes exceeds the limit of {o.max_update_bytes} (transport.max_update_bytes)")
            if header["num_examples"] <= 0:
                raise RejectedUpdate("num_examples", "an update must report at least one example")
            with o._lock:
                if task_id in o._completed:
                    raise RejectedUpdate("duplicate", f"task {task_id!r} was already uploaded")
            up = self._upload_for(header, context)
        except RejectedUpdate as exc:
            return self._reject(context, worker_id, task_id, exc)
        if not up.lock.acquire(timeout=10.0):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"an upload of task {task_id!r} is already in progress; retry")
        try:
            if header["offset"] != up.received:
                context.abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"upload of task {task_id!r} resumes at {header['offset']} but the coordinator holds {up.received} bytes; query and retry"
                )
            if header["offset"]:
                up.resumed += 1
                o._resumed_uploads += 1
                log_event("upload_resumed", worker=worker_id, task=task_id, offset=header["offset"], size=up.size)
            try:
                self._receive(up, request_iterator, info, context, task_id)
            except grpc.RpcError:  # the worker went away mid-stream: keep the verified prefix for a resume
                up.updated = time.time()
                log_event("upload_interrupted", worker=worker_id, task=task_id, received=up.received, size=up.size)
                raise
            except RejectedUpdate as exc:
                o._drop_upload(task_id, up)
                return self._reject(context, worker_id, task_id, exc)
            except ProtocolError as exc:
                o._drop_upload(task_id, up)
                return self._reject(context, worker_id, task_id, RejectedUpdate("malformed", str(exc)))
            up.updated = time.time()
            if up.received < up.size:  # the worker paused (half-closed early): resumable
                return pb.UpdateAck(accepted=False, reason="incomplete", received=up.received)
            try:
                if up.sha256 and up.digest.digest() != up.sha256:
                    raise RejectedUpdate("checksum", "sha256 of the received bytes does not match the header")
                expected = up.crc32c if up.crc32c is not None else up.crc32
                if expected is not None and up.crc != expected:
                    raise RejectedUpdate("checksum", f"{up.algo.name} of the received bytes does not match the header")
                state = up.decoder.finish()
                norm = check_update(state)  # tensor by tensor: a spooled update stays on disk
                check_norm(norm, o.max_update_norm)
            except ProtocolError as exc:
                o._drop_upload(task_id, up)
                return self._reject(context, worker_id, task_id, RejectedUpdate("malformed", str(exc)))
            except RejectedUpdate as exc:
                o._drop_upload(task_id, up)
                return self._reject(context, worker_id, task_id, exc)
            with o._lock:
                if task_id in o._completed:  # a racing duplicate finished first
                    o._drop_upload(task_id, up)
                    dup = RejectedUpdate("duplicate", f"task {task_id!r} was already uploaded")
                else:
                    dup = None
                    o._drop_upload(task_id, up)
                    o._completed[task_id] = None
                    while len(o._completed) > 100_000:
                        o._completed.popitem(last=False)
                    owner = o._inflight.pop(task_id, None)
                    o._pending = deque(t for t in o._pending if t.task_id != task_id)
                    if owner is not None and owner[1].round in o._round_stats:
                        o._round_stats[owner[1].round][1] += 1
                    info["tasks_done"] += 1
                    info.pop("current_task", None)
            if dup is not None:
                return self._reject(context, worker_id, task_id, dup)
        finally:
            up.lock.release()
        log_event("upload_accepted", worker=worker_id, task=task_id, bytes=up.size, resumed=up.resumed)
        o._events.put(
            TaskResult(
                task_id=task_id,
                client_id=header["client_id"],
                worker_id=worker_id,
                delta=state,
                num_examples=header["num_examples"],
                metrics=header["metrics"],
                bytes_up=up.size,
                norm=norm,
            )
        )
        return pb.UpdateAck(accepted=True, received=up.received)

    def _upload_for(self, header: dict[str, Any], context: grpc.ServicerContext) -> _Upload:
        """The partial upload this header continues, or a new one (validated by the engine's decoder)."""
        o = self.o
        task_id = header["task_id"]
        with o._lock:
            up = o._uploads.get(task_id)
            same = (
                up is not None
                and up.worker_id == header["worker_id"]
                and up.size == header["size"]
                and up.sha256 == header["sha256"]
                and up.crc32 == header["crc32"]
                and up.crc32c == header["crc32c"]
                and up.client_id == header["client_id"]
            )
            if up is not None and same and header["offset"] > 0:
                return up
            if header["offset"] > 0:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, f"no partial upload of task {task_id!r} to resume; start again at offset 0")
            if up is not None and not up.lock.locked():
                o._uploads.pop(task_id, None)
            elif up is not None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"another upload of task {task_id!r} is in progress; retry")
            if len(o._uploads) >= o.max_concurrent_uploads:
                idle = [(u.updated, tid) for tid, u in o._uploads.items() if not u.lock.locked()]
                if not idle:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(o._uploads)} uploads in progress (transport.max_concurrent_uploads); retry")
                _, oldest = min(idle)
                o._uploads.pop(oldest, None)
                log_event("upload_evicted", task=oldest)
        decoder = o.decoder_factory(task_id, header["client_id"])  # RejectedUpdate for unknown/closed tasks
        up = _Upload(header["worker_id"], header["client_id"], header["size"], header["sha256"], decoder, crc32=header["crc32"], crc32c=header["crc32c"])
        with o._lock:
            o._uploads[task_id] = up
        return up

    def _receive(self, up: _Upload, request_iterator: Iterator[pb.UpdateChunk], info: dict[str, Any], context: grpc.ServicerContext, task_id: str) -> None:
        o = self.o
        algo = up.algo
        for msg in request_iterator:
            data, crc_ok, crc = serde.checked_chunk(msg, up.received, algo)
            o._count(up=len(data), info=info)
            if not crc_ok:
                o._corrupt_chunks += 1
                log_event("chunk_corrupt", level=logging.WARNING, worker=up.worker_id, task=task_id, offset=up.received)
                context.abort(grpc.StatusCode.DATA_LOSS, f"chunk at offset {up.received} failed its {algo.name}; resume from {up.received}")
            if up.received + len(data) > up.size:
                raise RejectedUpdate("malformed", f"more than the declared {up.size} bytes")
            up.decoder.feed(data)
            if not up.checked_tensors:
                self._check_tensor_sizes(up)
            if up.sha256:
                up.digest.update(data)
            up.crc = crc32_combine(up.crc, crc, len(data), algo.poly)
            up.received += len(data)
            info["last_seen"] = time.time()

    def _check_tensor_sizes(self, up: _Upload) -> None:
        entries = getattr(up.decoder, "_entries", None)
        if not entries:
            return
        up.checked_tensors = True
        for name, _dtype, _shape, start, end in entries:
            if end - start > self.o.max_tensor_bytes:
                raise RejectedUpdate("too_large", f"tensor {name!r} has {end - start} bytes (transport.max_tensor_bytes={self.o.max_tensor_bytes})")

    def _reject(self, context: grpc.ServicerContext, worker_id: str, task_id: str, exc: RejectedUpdate) -> pb.UpdateAck:
        self.o._reject_count += 1
        log_event("upload_rejected", level=logging.WARNING, worker=worker_id, task=task_id, reason=exc.reason, detail=str(exc))
        self.o._events.put(Rejection(task_id=task_id, worker_id=worker_id, reason=exc.reason, detail=str(exc)))
        context.abort(_REASON_CODES.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self._worker(request.worker_id, request.session, context)
        return pb.HeartbeatReply(stop=self.o._stop_reason is not None, round=self.o.current_round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        info = self._worker(request.worker_id, request.session, context)
        with self.o._cond:
            info["left"] = True
            info["alive"] = False
            info.pop("current_task", None)
            n = self.o._requeue(request.worker_id)
            self.o._cond.notify_all()
        log_event("worker_left", worker=request.worker_id, requeued=n)
        return pb.LeaveReply()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        o = self.o
        with o._lock:
            submitted, done = o._round_stats.get(o.current_round, [0, 0])
            workers = []
            for wid, w in sorted(o._workers.items()):
                state = "left" if w["left"] else "alive" if w["alive"] else "dead" if w["session"] else "known"
                workers.append(
                    pb.WorkerStatus(
                        worker_id=wid,
                        state=state,
                        last_seen=w["last_seen"],
                        tasks_done=w["tasks_done"],
                        bytes_up=w["bytes_up"],
                        bytes_down=w["bytes_down"],
                        own_data=w["own_data"],
                        client_ids=w["client_ids"],
                        current_task=w.get("current_task", ""),
                        address=w.get("address", ""),
                    )
                )
            return pb.StatusReply(
                run_id=o.run_id,
                round=o.current_round,
                total_rounds=o.total_rounds,
                tasks_submitted=submitted,
                tasks_done=done,
                tasks_pending=len(o._pending),
                tasks_inflight=len(o._inflight),
                uploads_partial=len(o._uploads),
                bytes_up=o._bytes_up,
                bytes_down=o._bytes_down,
                stop_reason=o._stop_reason or "",
                workers=workers,
                uptime_s=time.time() - o.started,
                rejected=o._reject_count,
            )


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
        max_tensor_bytes: int = 1 << 31,
        max_update_norm: float | None = None,
        max_concurrent_uploads: int = 32,
        poll_timeout_s: float = 2.0,
        heartbeat_s: float = 5.0,
        dead_after_s: float = 30.0,
        resume_window_s: float = 600.0,
        authenticate: Any = None,
        tokens: TokenStore | None = None,
        credentials: grpc.ServerCredentials | None = None,
        registry_path: str | os.PathLike[str] | None = None,
        total_rounds: int = 0,
        max_threads: int = 64,
    ) -> None:
        self.listen = listen
        self.run_id = run_id
        self.config_yaml = config_yaml
        self.num_clients = num_clients
        self.decoder_factory = decoder_factory
        self.chunk_bytes = chunk_bytes
        self.max_update_bytes = max_update_bytes
        self.max_tensor_bytes = max_tensor_bytes
        self.max_update_norm = max_update_norm
        self.max_concurrent_uploads = max(1, max_concurrent_uploads)
        self.poll_timeout_s = poll_timeout_s
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.resume_window_s = resume_window_s
        self.authenticate = authenticate or (lambda worker_id, token: True)
        self.tokens = tokens
        self.credentials = credentials
        self.registry_path = Path(registry_path) if registry_path else None
        self.total_rounds = total_rounds
        self.current_round = 0
        self.started = time.time()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._workers: dict[str, dict[str, Any]] = {}
        self._blobs: OrderedDict[str, Blob | FramedBlob] = OrderedDict()
        self._blob_crcs: dict[str, _ChunkCrcs] = {}
        self._blob_round: dict[str, int] = {}
        self._pending: deque[TrainTask] = deque()
        self._pinned: dict[int, str] = {}
        self._inflight: dict[str, tuple[str, TrainTask, float]] = {}
        self._uploads: dict[str, _Upload] = {}
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._round_stats: dict[int, list[int]] = {}
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop_reason: str | None = None
        self._bytes_up = 0
        self._bytes_down = 0
        self._reject_count = 0
        self._resumed_uploads = 0
        self._corrupt_chunks = 0
        self._reaper_stop = threading.Event()
        self._load_registry()
        interceptors = []
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens.check, self._on_refused))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="dpeft-grpc"),
            options=channel_options(chunk_bytes),
            interceptors=interceptors,
        )
        add_servicer(_Servicer(self), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port: int | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> str:
        if self.credentials is not None:
            self.port = self._server.add_secure_port(self.listen, self.credentials)
        else:
            self.port = self._server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        self._server.start()
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._reaper, name="dpeft-liveness", daemon=True).start()
        host = self.listen.rsplit(":", 1)[0]
        log_event("listening", address=f"{host}:{self.port}", tls=self.credentials is not None, auth=self.tokens is not None)
        return f"{host}:{self.port}"

    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        with self._cond:
            self._stop_reason = reason
            self._cond.notify_all()
        log_event("shutdown", reason=reason)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(w["alive"] and not w["left"] for w in list(self._workers.values())):
            time.sleep(0.05)
        self._reaper_stop.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace=0.5).wait()

    def _on_refused(self, method: str, worker_id: str, message: str) -> None:
        log_event("auth_refused", level=logging.WARNING, method=method, worker=worker_id or "?", detail=message)
        if method == "PushUpdate":
            self._reject_count += 1
            self._events.put(Rejection(task_id="?", worker_id=worker_id or "?", reason="unauthenticated", detail=message))

    # -- registry (survives restarts) -------------------------------------------
    def _load_registry(self) -> None:
        if self.registry_path is None or not self.registry_path.is_file():
            return
        try:
            data = json.loads(self.registry_path.read_text())
            entries = data["workers"]
            for wid, w in entries.items():
                self._workers[str(wid)] = {
                    "session": "",
                    "own_data": bool(w.get("own_data", False)),
                    "own_examples": int(w.get("own_examples", 0)),
                    "client_ids": [int(c) for c in w.get("client_ids", [])],
                    "joined": 0.0,
                    "last_seen": 0.0,
                    "alive": False,
                    "left": False,
                    "tasks_done": 0,
                    "bytes_up": 0,
                    "bytes_down": 0,
                }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("worker registry %s is unreadable (%s); starting with an empty one", self.registry_path, exc)
            self._workers.clear()
            return
        log_event("registry_loaded", workers=len(self._workers))

    def _save_registry(self) -> None:
        if self.registry_path is None:
            return
        data = {"workers": {wid: {"own_data": w["own_data"], "own_examples": w["own_examples"], "client_ids": w["client_ids"]} for wid, w in self._workers.items()}}
        from dpeft.fsutil import atomic_write

        try:
            self.registry_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.registry_path, [json.dumps(data, indent=1).encode()])
        except OSError as exc:  # the run goes on; a restart would re-assign client slots
            log.warning("cannot write the worker registry %s: %s", self.registry_path, exc)

    # -- liveness -----------------------------------------------------------------
    def _reaper(self) -> None:
        tick = max(0.05, min(1.0, self.dead_after_s / 4))
        while not self._reaper_stop.wait(tick):
            now = time.time()
            with self._cond:
                for wid, w in self._workers.items():
                    if w["alive"] and not w["left"] and now - w["last_seen"] > self.dead_after_s:
                        w["alive"] = False
                        task = w.pop("current_task", "")
                        n = self._requeue(wid)
                        log_event("worker_dead", level=logging.WARNING, worker=wid, silent_s=now - w["last_seen"], requeued=n, task=task)
                        self._cond.notify_all()
                for tid, up in list(self._uploads.items()):
                    if not up.lock.locked() and now - up.updated > self.resume_window_s:
                        self._uploads.pop(tid, None)
                        log_event("upload_expired", task=tid, received=up.received)

    def worker_gone(self, worker_id: str, reason: str) -> int:
        """A worker known to be gone (its process died): its in-flight tasks go back to the queue
        now, not after ``dead_after_s``; returns how many. A worker joining again under that id
        starts a new session."""
        with self._cond:
            w = self._workers.get(worker_id)
            task = w.pop("current_task", "") if w is not None else ""
            if w is not None:
                w["alive"] = False
            n = self._requeue(worker_id)
            self._cond.notify_all()
        log_event("worker_dead", level=logging.WARNING, worker=worker_id, reason=reason, requeued=n, task=task)
        return n

    def _requeue(self, worker_id: str) -> int:
        """Put a gone worker's in-flight tasks back at the front of the queue (lock held)."""
        mine = [(tid, t) for tid, (w, t, _) in self._inflight.items() if w == worker_id]
        for tid, task in reversed(mine):
            del self._inflight[tid]
            self._pending.appendleft(task)
        return len(mine)

    # -- engine-facing ---------------------------------------------------------
    #: payloads kept beyond those a queued or in-flight task refers to
    keep_blobs = 2

    def publish_blob(self, blob_id: str, payload: Blob) -> None:
        """Publish a payload. An in-memory one is kept as its response frames (:class:`FramedBlob`:
        one CRC-32C pass and one copy now, instead of a serialization copy per worker's download;
        the caller's bytes are not kept, so the payload is held once); a spooled one stays in its
        file. Both outside the lock."""
        if not isinstance(payload, SpooledBlob):
            payload = FramedBlob(payload, self.chunk_bytes)  # type: ignore[assignment]
        crcs = _ChunkCrcs(payload, self.chunk_bytes)
        with self._lock:
            self._blobs[blob_id] = payload
            self._blob_crcs[blob_id] = crcs

    def _crcs_of(self, blob_id: str, blob: Blob | FramedBlob) -> _ChunkCrcs:
        """The chunk CRC cache of a published payload (built again, not kept, when a prune raced this read)."""
        crcs = self._blob_crcs.get(blob_id)
        if crcs is None or crcs.size != len(blob):
            crcs = _ChunkCrcs(blob, self.chunk_bytes)
            with self._lock:
                if self._blobs.get(blob_id) is blob:  # not pruned meanwhile
                    self._blob_crcs[blob_id] = crcs
        return crcs

    def _with_crc32c(self, task: TrainTask) -> TrainTask:
        """``task`` as handed to a worker: with its payload's CRC-32C (which also tells the worker
        that this coordinator speaks CRC-32C)."""
        blob = self._blobs.get(task.blob_id)
        if blob is None:
            return task  # not published (the fetch will say so)
        return replace(task, blob_crc32c=self._crcs_of(task.blob_id, blob).whole_crc32c)

    def _prune_blobs(self) -> None:
        """Drop payloads no queued or in-flight task needs, except the newest ``keep_blobs``."""
        needed = {t.blob_id for t in self._pending} | {t.blob_id for _, t, _ in self._inflight.values()}
        # the engine may hand out a payload of the current round again without republishing it
        # (async refills, re-sent tasks, one payload per LoRA rank): keep the whole newest round
        needed |= {b for b, r in self._blob_round.items() if r >= self.current_round}
        names = list(self._blobs)
        for name in names[: max(0, len(names) - self.keep_blobs)]:
            if name not in needed:
                del self._blobs[name]
                self._blob_crcs.pop(name, None)
                self._blob_round.pop(name, None)

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        with self._cond:
            self._pinned = dict(pinned)
            self._pending.extend(tasks)
            for t in tasks:
                self._blob_round[t.blob_id] = max(t.round, self._blob_round.get(t.blob_id, t.round))
                if t.round >= self.current_round:
                    self.current_round = t.round
                self._round_stats.setdefault(t.round, [0, 0])[0] += 1
                self._completed.pop(t.task_id, None)  # a re-submitted task may be uploaded again
            for r in [r for r in self._round_stats if r < self.current_round - 5]:
                del self._round_stats[r]
            self._prune_blobs()
            self._cond.notify_all()
        if tasks:
            log_event("tasks_submitted", round=tasks[0].round, count=len(tasks))

    def forget_tasks(self, task_ids: list[str]) -> None:
        drop = set(task_ids)
        with self._lock:
            self._pending = deque(t for t in self._pending if t.task_id not in drop)
            for tid in drop:
                self._inflight.pop(tid, None)
                self._uploads.pop(tid, None)
            self._prune_blobs()

    #: most tasks one poll takes (PollRequest.max_tasks is capped here)
    max_tasks_per_poll = 64

    def _take_tasks(self, worker_id: str, info: dict[str, Any], max_tasks: int = 1) -> list[TrainTask]:
        """Tasks for a polling worker (lock held): the first it may run, plus more of that round.

        With ``max_tasks`` > 1 (a worker training clients together), the worker gets its fair
        share of the round's tasks it may run: ceil(those tasks / idle virtual-client hosts,
        itself included), at most ``max_tasks``, so the other idle workers are not starved.
        """
        mine = [i for i, t in enumerate(self._pending) if self._may_run(t, worker_id, info)]
        if not mine:
            return []
        limit = min(max(1, max_tasks), self.max_tasks_per_poll)
        if limit > 1:
            round_num = self._pending[mine[0]].round
            mine = [i for i in mine if self._pending[i].round == round_num]
            busy = {w for w, _, _ in self._inflight.values()}
            idle = sum(
                1 for wid, w in self._workers.items() if wid == worker_id or (w["alive"] and not w["left"] and not w["own_data"] and wid not in busy)
            )
            limit = min(limit, -(-len(mine) // max(1, idle)))
        taken = [self._pending[i] for i in mine[:limit]]
        drop = {t.task_id for t in taken}
        self._pending = deque(t for t in self._pending if t.task_id not in drop)
        now = time.time()
        for task in taken:
            self._inflight[task.task_id] = (worker_id, task, now)
        info["current_task"] = ",".join(t.task_id for t in taken)
        return taken

    def _may_run(self, task: TrainTask, worker_id: str, info: dict[str, Any]) -> bool:
        owner = self._pinned.get(task.client_id)
        return owner == worker_id or (owner is None and not info["own_data"])

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
            self._uploads.clear()
            for w in self._workers.values():
                w.pop("current_task", None)
            return ids

    def workers(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v, session="") for k, v in self._workers.items()}

    def bytes_moved(self) -> tuple[int, int]:
        with self._lock:
            return self._bytes_up, self._bytes_down

    def stats(self) -> dict[str, int]:
        """Transport counters (uploads resumed, corrupt chunks, rejections, partial uploads held)."""
        with self._lock:
            return {
                "uploads_resumed": self._resumed_uploads,
                "corrupt_chunks": self._corrupt_chunks,
                "rejected": self._reject_count,
                "uploads_partial": len(self._uploads),
            }

    def _count(self, up: int = 0, down: int = 0, info: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._bytes_up += up
            self._bytes_down += down
            if info is not None:
                info["bytes_up"] += up
                info["bytes_down"] += down

    def _drop_upload(self, task_id: str, up: _Upload) -> None:
        with self._lock:
            if self._uploads.get(task_id) is up:
                del self._uploads[task_id]
