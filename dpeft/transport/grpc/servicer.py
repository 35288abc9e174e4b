"""The Coordinator service's RPC handlers: thin glue between gRPC and the coordinator transport.

Each handler converts its request with :mod:`dpeft.transport.serde`, checks the caller (the
worker id must be the one its token was issued for, the session current), calls the
transport (:class:`~.server.GrpcCoordinatorTransport`) and turns outcomes into gRPC statuses.
Uploads run the state machine of :mod:`.uploads`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from dpeft.errors import ProtocolError, RejectedUpdate
from dpeft.transport import serde
from dpeft.transport.auth import metadata_identity
from dpeft.transport.base import Rejection, TaskResult
from dpeft.transport.events import log_event
from dpeft.transport.grpc.channel import SERVICE_NAME
from dpeft.transport.grpc.uploads import CorruptChunk, Upload, UploadConflict
from dpeft.transport.messages import HeartbeatAnswer, UploadProgress, UploadVerdict
from dpeft.transport.registry import NoFreeClientSlot, WorkerRecord

if TYPE_CHECKING:
    from dpeft.transport.grpc.server import GrpcCoordinatorTransport

#: rejection reason -> gRPC status code (everything else: INVALID_ARGUMENT)
REASON_CODES = {
    "unknown_task": grpc.StatusCode.FAILED_PRECONDITION,
    "stale": grpc.StatusCode.FAILED_PRECONDITION,
    "late": grpc.StatusCode.FAILED_PRECONDITION,
    "closed": grpc.StatusCode.FAILED_PRECONDITION,
    "too_stale": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_client": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}
_CONFLICT_CODES = {"offset": grpc.StatusCode.OUT_OF_RANGE, "busy": grpc.StatusCode.RESOURCE_EXHAUSTED}


class StaleSession(Exception):
    """A call with a session this coordinator does not know (the worker must join again)."""


def add_servicer(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    """Register the Coordinator service with serde's (de)serializers (the bulk streams zero-copy)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, codec in serde.COORDINATOR_RPCS.items():
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
        }[(codec.request_stream, codec.response_stream)]
        handlers[name] = kind(getattr(servicer, name), request_deserializer=codec.parse_request, response_serializer=codec.serialize_response)
    missing = serde.proto_rpc_names() - set(handlers)
    if missing:  # pragma: no cover - a new RPC in the proto must be added to serde.COORDINATOR_RPCS
        raise RuntimeError(f"add_servicer does not register {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class CoordinatorServicer:
    """The handlers of the Coordinator service (registered by :func:`add_servicer`)."""

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

    def _worker(self, worker_id: str, session: str, context: grpc.ServicerContext) -> WorkerRecord:
        self._identity(worker_id, context)
        try:
            return self.o.session_worker(worker_id, session)
        except StaleSession as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))
            raise AssertionError("unreachable") from None  # context.abort raises

    # -- RPCs ---------------------------------------------------------------
    def Join(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            join = serde.join_from_proto(request)
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._identity(join.worker_id, context)
        if self.o.tokens is None and not self.o.authenticate(join.worker_id, join.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token for this worker id")
        try:
            answer = self.o.join(join, context.peer())
        except NoFreeClientSlot as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return serde.join_answer_to_proto(answer)

    def PollTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        ask = serde.poll_from_proto(request)
        record = self._worker(ask.worker_id, ask.session, context)
        return serde.poll_answer_to_proto(self.o.poll(record, ask.max_tasks, context.is_active))

    def FetchBlob(self, request: Any, context: grpc.ServicerContext) -> Iterator[serde.BlobPiece | bytes]:
        ask = serde.fetch_from_proto(request)
        record = self._worker(ask.worker_id, ask.session, context)
        blob = self.o.payloads.get(ask.blob_id)
        if blob is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no payload {ask.blob_id!r} (round already closed?)")
            return  # abort raised
        if not 0 <= ask.offset <= len(blob):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {ask.offset} outside 0..{len(blob)}")
        for nbytes, frame in self.o.payloads.chunks(ask.blob_id, blob, ask.offset, ask.crc32c):
            self.o.count(down=nbytes, record=record)  # a long download is a sign of life too
            yield frame  # serialized by serde.encode_blob_chunk

    def QueryUpload(self, request: Any, context: grpc.ServicerContext) -> Any:
        ask = serde.upload_query_from_proto(request)
        self._worker(ask.worker_id, ask.session, context)
        received, size = self.o.uploads.progress(ask.task_id, ask.worker_id)
        return serde.upload_progress_to_proto(UploadProgress(received, size))

    def PushUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        o = self.o
        worker_id, task_id = "?", "?"
        try:
            try:
                header = serde.update_header_from_proto(next(request_iterator, None))
            except ProtocolError as exc:
                raise RejectedUpdate("malformed", str(exc)) from None
            worker_id, task_id = header.worker_id, header.task_id
            record = self._worker(worker_id, header.session, context)
            if header.size > o.settings.max_update_bytes:
                raise RejectedUpdate("too_large", f"{header.size} bytes exceeds the limit of {o.settings.max_update_bytes} (transport.max_update_bytes)")
            if header.num_examples <= 0:
                raise RejectedUpdate("num_examples", "an update must report at least one example")
            if o.uploads.is_done(task_id):
                raise RejectedUpdate("duplicate", f"task {task_id!r} was already uploaded")
            try:
                up, evicted = o.uploads.open(header, o.decoder_factory)
            except UploadConflict as exc:
                context.abort(_CONFLICT_CODES[exc.kind], str(exc))
            for old in evicted:
                log_event("upload_evicted", task=old)
        except RejectedUpdate as exc:
            return self._reject(context, worker_id, task_id, exc)
        if not up.lock.acquire(timeout=10.0):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"an upload of task {task_id!r} is already in progress; retry")
        try:
            verdict = self._continue(up, header.offset, request_iterator, record, context)
            if verdict is not None:
                return serde.upload_verdict_to_proto(verdict)
            try:
                state, norm = up.complete(o.settings.max_update_norm)
            except ProtocolError as exc:
                o.uploads.drop(task_id, up)
                return self._reject(context, worker_id, task_id, RejectedUpdate("malformed", str(exc)))
            except RejectedUpdate as exc:
                o.uploads.drop(task_id, up)
                return self._reject(context, worker_id, task_id, exc)
            if not o.uploads.mark_done(task_id, up):  # a racing duplicate finished first
                return self._reject(context, worker_id, task_id, RejectedUpdate("duplicate", f"task {task_id!r} was already uploaded"))
        finally:
            up.lock.release()
        log_event("upload_accepted", worker=worker_id, task=task_id, bytes=up.size, resumed=up.resumed)
        o.deliver(
            TaskResult(
                task_id=task_id,
                client_id=header.client_id,
                worker_id=worker_id,
                delta=state,
                num_examples=header.num_examples,
                metrics=header.metrics,
                bytes_up=up.size,
                norm=norm,
            )
        )
        return serde.upload_verdict_to_proto(UploadVerdict(accepted=True, received=up.received))

    def _continue(self, up: Upload, offset: int, request_iterator: Iterator[Any], record: WorkerRecord, context: grpc.ServicerContext) -> UploadVerdict | None:
        """Receive an upload's chunks from ``offset`` (lock held). None when it is complete;
        an "incomplete" verdict when the worker paused (resumable); a rejection aborts."""
        o = self.o
        h = up.header
        if offset != up.received:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"upload of task {h.task_id!r} resumes at {offset} but the coordinator holds {up.received} bytes; query and retry"
            )
        if offset:
            up.resumed += 1
            o.count_event("uploads_resumed")
            log_event("upload_resumed", worker=h.worker_id, task=h.task_id, offset=offset, size=up.size)
        try:
            up.receive(request_iterator, o.settings.max_tensor_bytes, lambda n: o.count(up=n, record=record))
        except CorruptChunk as exc:
            o.count_event("corrupt_chunks")
            log_event("chunk_corrupt", level=logging.WARNING, worker=h.worker_id, task=h.task_id, offset=exc.offset)
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except grpc.RpcError:  # the worker went away mid-stream: keep the verified prefix for a resume
            up.updated = time.time()
            log_event("upload_interrupted", worker=h.worker_id, task=h.task_id, received=up.received, size=up.size)
            raise
        except RejectedUpdate as exc:
            o.uploads.drop(h.task_id, up)
            self._reject(context, h.worker_id, h.task_id, exc)
        except ProtocolError as exc:
            o.uploads.drop(h.task_id, up)
            self._reject(context, h.worker_id, h.task_id, RejectedUpdate("malformed", str(exc)))
        up.updated = time.time()
        if up.received < up.size:  # the worker paused (half-closed early): resumable
            return UploadVerdict(accepted=False, reason="incomplete", received=up.received)
        return None

    def _reject(self, context: grpc.ServicerContext, worker_id: str, task_id: str, exc: RejectedUpdate) -> Any:
        # an update that arrives after its round or the run closed is expected (async, deadline): info, not a warning
        level = logging.INFO if exc.routine else logging.WARNING
        log_event("upload_rejected", level=level, worker=worker_id, task=task_id, reason=exc.reason, detail=str(exc))
        self.o.deliver(Rejection(task_id=task_id, worker_id=worker_id, reason=exc.reason, detail=str(exc)))
        context.abort(REASON_CODES.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        call = serde.heartbeat_from_proto(request)
        self._worker(call.worker_id, call.session, context)
        return serde.heartbeat_answer_to_proto(HeartbeatAnswer(stop=self.o.stop_reason is not None, round=self.o.current_round))

    def Leave(self, request: Any, context: grpc.ServicerContext) -> Any:
        call = serde.leave_from_proto(request)
        self.o.leave(self._worker(call.worker_id, call.session, context))
        return serde.leave_answer_to_proto()

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return serde.status_to_proto(self.o.status())
