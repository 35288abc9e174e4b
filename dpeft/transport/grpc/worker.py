"""gRPC worker connection: dials the coordinator, polls tasks, streams payloads both ways.

Built to survive real networks:

- every call carries the worker id and bearer token as metadata (TLS with a CA file, or the
  system roots; optionally a client certificate for mutual TLS);
- transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, ...) are retried with exponential
  backoff and full jitter for up to ``patience_s``; a coordinator that restarted answers
  ABORTED ("unknown session") and the worker joins again by itself (same worker id, so the
  same client ids) -- a coordinator now serving a different run is an error;
- a heartbeat thread keeps the worker alive on the coordinator while it trains;
- downloads resume from the byte offset reached; uploads resume from the offset the
  coordinator acknowledges (QueryUpload), each chunk carrying a CRC so a corrupted chunk is
  re-sent instead of poisoning the update. ``bytes_resent`` counts what went twice. The whole
  payload is checked by a CRC combined from the chunk CRCs (:mod:`dpeft.codec.crc`: no
  second pass over the data), and chunks go through serde's zero-copy (de)serializers.
- the CRC is CRC-32C (hardware, the ``crc32c`` package) when the task carries
  ``blob_crc32c`` -- which is how a coordinator says it speaks CRC-32C: the download then asks
  for CRC-32C chunks and the upload declares ``crc32c`` -- and CRC-32 (zlib) with an older
  coordinator (see :mod:`dpeft.transport.grpc.server`).
- UNAUTHENTICATED / PERMISSION_DENIED are final (:class:`AuthRefused`), and so are TLS settings
  that cannot work (:class:`~dpeft.transport.grpc.tls_check.TlsMismatch`, exit 2, naming the flag).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from dpeft.codec.crc import CRC32C, chunk_crcs, combine_chunks
from dpeft.config.schema import MAX_CHUNK_BYTES
from dpeft.errors import DpeftError
from dpeft.transport import serde
from dpeft.transport.auth import call_metadata
from dpeft.transport.base import TrainTask, WorkerConnection, WorkerRegistration
from dpeft.transport.grpc.channel import backoff_s, channel_options
from dpeft.transport.grpc.download import RETRYABLE, Downloads, retryable, wire_crc
from dpeft.transport.grpc.tls_check import TlsMismatch, speaks_tls, tls_problem
from dpeft.transport.messages import PollAsk, SessionCall, UpdateHeader, UploadQueryAsk, WorkerJoin

log = logging.getLogger("dpeft.transport.grpc")
T = TypeVar("T")

#: an upload attempt that failed this way continues from the acknowledged offset
_UPLOAD_RETRYABLE = RETRYABLE | {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.CANCELLED}
_REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}


class CoordinatorGone(ConnectionError):
    """The coordinator could not be reached for longer than the worker's patience."""


class AuthRefused(DpeftError):
    """The coordinator refused this worker's credentials (bad or revoked token, wrong worker id)."""


class GrpcWorkerConnection(Downloads, WorkerConnection):
    """One worker's channel to the coordinator."""

    def __init__(
        self,
        address: str,
        token: str = "",
        chunk_bytes: int = 4 << 20,
        patience_s: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        heartbeat: bool = True,
    ) -> None:
        self.address = address
        self.token = token
        #: upload chunk size: ``chunk_bytes``, or the coordinator's ``transport.chunk_bytes`` once
        #: joined where that is smaller (its messages are limited to it); downloads come in the
        #: coordinator's chunks, which any valid run config keeps within MAX_CHUNK_BYTES
        self.chunk_bytes = chunk_bytes
        self._own_chunk_bytes = chunk_bytes
        self.patience_s = patience_s
        self.credentials = credentials
        self._tls_probed = False
        options: list[tuple[str, Any]] = list(channel_options(chunk_bytes, receive_chunk_bytes=max(chunk_bytes, MAX_CHUNK_BYTES)))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is not None:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        # every RPC with serde's (de)serializers (the bulk streams zero-copy; same protobuf bytes on the wire)
        self._rpc: dict[str, Callable[..., Any]] = {}
        for name, codec in serde.COORDINATOR_RPCS.items():
            make = self.channel.stream_unary if codec.request_stream else self.channel.unary_stream if codec.response_stream else self.channel.unary_unary
            self._rpc[name] = make(codec.path, request_serializer=codec.serialize_request, response_deserializer=codec.parse_response)
        self.worker_id = ""
        self.session = ""
        self.run_id = ""
        self._join_args: tuple[str, int | None] | None = None
        self._join_lock = threading.Lock()
        self._cache: tuple[str, bytes | bytearray | mmap.mmap] | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_resent = 0
        self.rejoins = 0
        self.heartbeat_enabled = heartbeat
        self.heartbeat_s = 5.0
        self.stop_requested = threading.Event()
        self._closed = threading.Event()
        self._hb_thread: threading.Thread | None = None
        #: test hook: called with (offset, data) for each outgoing upload chunk after its CRC is
        #: computed; may return altered bytes (corruption) or raise to cut the stream
        self.chunk_hook: Callable[[int, bytes], bytes] | None = None

    # -- plumbing -----------------------------------------------------------------
    def _md(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.worker_id, self.token)

    def _session_call(self) -> SessionCall:
        return SessionCall(self.worker_id, self.session)

    def _final(self, exc: grpc.RpcError) -> None:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise AuthRefused(f"coordinator at {self.address} refused worker {self.worker_id!r}: {exc.details()}") from None

    def _check_tls(self, exc: grpc.RpcError) -> None:
        """Raise :class:`TlsMismatch` when the connection failed for TLS settings that cannot work."""
        details = exc.details() or ""
        tls = self.credentials is not None
        problem = tls_problem(details, self.address, tls)
        if problem is None and not tls and "Socket closed" in details and not self._tls_probed:
            self._tls_probed = True  # one handshake on the side: a TLS coordinator, or one going away?
            if speaks_tls(self.address):
                problem = f"TLS: the coordinator at {self.address} speaks TLS and this worker dialled in plaintext; pass --ca CA.pem (or --tls)"
        if problem is not None:
            raise TlsMismatch(problem) from None

    def _call(self, fn: Callable[[], T], rejoin: bool = True) -> T:
        """Call ``fn`` until it succeeds: back off on transient errors, re-join on ABORTED."""
        start = time.time()
        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()
                self._final(exc)
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._check_tls(exc)
                if code == grpc.StatusCode.ABORTED and rejoin and self._join_args is not None:
                    log.warning("coordinator says: %s; joining again", exc.details())
                    self._rejoin()
                    continue
                if not retryable(exc):
                    raise
                if time.time() - start > self.patience_s:
                    raise CoordinatorGone(
                        f"coordinator at {self.address} unreachable for {self.patience_s:.0f}s ({code.name}: {exc.details()})"
                    ) from None
                if self._closed.is_set():
                    raise CoordinatorGone("connection closed") from None
                time.sleep(backoff_s(attempt))
                attempt += 1

    # -- join / heartbeat -----------------------------------------------------------
    def _join_once(self) -> WorkerRegistration:
        worker_id, own_examples = self._join_args  # type: ignore[misc]
        req = serde.join_to_proto(WorkerJoin(worker_id, self.token, own_examples is not None, own_examples or 0, list(self.task_kinds)))
        reply = serde.join_answer_from_proto(self._call(lambda: self._rpc["Join"](req, timeout=10, metadata=self._md()), rejoin=False))
        if self.run_id and reply.run_id != self.run_id:
            raise DpeftError(f"coordinator at {self.address} now serves a different run ({reply.run_id}, was {self.run_id}); restart this worker")
        self.run_id = reply.run_id
        self.session = reply.session
        if reply.heartbeat_s > 0:
            self.heartbeat_s = reply.heartbeat_s
        config = serde.config_from_text(reply.config_yaml)
        theirs = (config.get("transport") or {}).get("chunk_bytes")
        if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs > 0:
            self.chunk_bytes = min(self._own_chunk_bytes, theirs)
        return WorkerRegistration(
            run_id=reply.run_id,
            session=reply.session,
            config=config,
            client_ids=reply.client_ids,
            heartbeat_s=reply.heartbeat_s,
        )

    def _rejoin(self) -> None:
        stale = self.session
        with self._join_lock:
            if self.session != stale:  # another thread re-joined meanwhile
                return
            now = time.time()
            self._rejoin_times = [x for x in getattr(self, "_rejoin_times", []) if now - x < 60] + [now]
            if len(self._rejoin_times) > 5:
                raise DpeftError(
                    f"worker id {self.worker_id!r} had to join {len(self._rejoin_times)} times in a minute: "
                    "is another worker running with the same id?"
                )
            reg = self._join_once()
            self.rejoins += 1
            log.warning("worker %s joined again (session %s, clients %s)", self.worker_id, reg.session, reg.client_ids or "virtual")

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        self.worker_id = worker_id
        self._join_args = (worker_id, own_examples)
        with self._join_lock:
            reg = self._join_once()
        if self.heartbeat_enabled and self._hb_thread is None:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="dpeft-heartbeat", daemon=True)
            self._hb_thread.start()
        return reg

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.heartbeat_s):
            try:
                reply = self._heartbeat_once()
            except AuthRefused as exc:
                log.error("%s", exc)
                self.stop_requested.set()
                return
            except (CoordinatorGone, grpc.RpcError, DpeftError) as exc:
                log.info("heartbeat failed: %s", exc)
                continue
            if reply.stop:
                self.stop_requested.set()

    def _heartbeat_once(self) -> Any:
        reply = self._call(lambda: self._rpc["Heartbeat"](serde.heartbeat_to_proto(self._session_call()), timeout=10, metadata=self._md()))
        return serde.heartbeat_answer_from_proto(reply)

    def heartbeat(self) -> dict[str, Any]:
        return dataclasses.asdict(self._heartbeat_once())

    # -- tasks ------------------------------------------------------------------------
    def poll(self) -> TrainTask | float | str:
        item = self.poll_many(1)
        return item[0] if isinstance(item, list) else item

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        want = max(1, int(max_tasks))
        reply = self._call(
            lambda: self._rpc["PollTask"](serde.poll_to_proto(PollAsk(self.worker_id, self.session, want)), timeout=30, metadata=self._md())
        )
        answer = serde.poll_answer_from_proto(reply)
        if answer.tasks:
            return answer.tasks
        if answer.stop_reason is not None:
            return answer.stop_reason
        return answer.wait_s

    def query_upload(self, task_id: str) -> int:
        """Bytes of our upload of ``task_id`` the coordinator holds (where to resume)."""
        def query() -> Any:  # the session is read at each try: a re-join replaces it
            ask = UploadQueryAsk(self.worker_id, self.session, task_id)
            return self._rpc["QueryUpload"](serde.upload_query_to_proto(ask), timeout=10, metadata=self._md())

        reply = self._call(query)
        return serde.upload_progress_from_proto(reply).received

    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        """Upload ``payload`` in CRC-checked chunks, resuming after drops; (accepted, reason).

        One pass over the payload computes every chunk's CRC-32C (CRC-32 for an older
        coordinator, :func:`wire_crc`); the whole-payload CRC the header carries is combined from
        them (:mod:`dpeft.codec.crc`), and chunks are serialized straight from the payload's
        memory."""
        size = len(payload)
        view = memoryview(payload).cast("B")
        step = self.chunk_bytes
        algo = wire_crc(task)
        use_c = algo == CRC32C
        crcs = chunk_crcs(view, step, algo.fn)
        whole = combine_chunks(((c, min(step, size - i * step)) for i, c in enumerate(crcs)), poly=algo.poly)
        header = UpdateHeader(self.worker_id, self.session, task.task_id, task.client_id, num_examples, dict(metrics), size)
        header = dataclasses.replace(header, crc32c=whole) if use_c else dataclasses.replace(header, crc32=whole)
        sent = 0
        offset = 0
        start = time.time()
        attempt = 0
        while True:
            cut: list[BaseException] = []

            def chunks(first: int, cut: list[BaseException] = cut) -> Iterator[Any]:
                nonlocal sent
                yield serde.update_header_to_proto(dataclasses.replace(header, worker_id=self.worker_id, session=self.session, offset=first))
                pos = first
                while pos < size:
                    end = min(size, (pos // step + 1) * step)  # back on the grid after a resume off it
                    data = view[pos:end]  # no copy: serialized straight from the payload
                    if pos % step:
                        msg = serde.data_piece(pos, data, algo)
                    else:
                        msg = serde.DataPiece(pos, data, 0, crcs[pos // step]) if use_c else serde.DataPiece(pos, data, crcs[pos // step])
                    if self.chunk_hook is not None:
                        try:
                            msg = msg._replace(data=self.chunk_hook(pos, bytes(data)))
                        except BaseException as exc:
                            cut.append(exc)
                            raise
                    sent += len(data)
                    pos = end
                    yield msg

            try:
                ack = serde.upload_verdict_from_proto(self._rpc["PushUpdate"](chunks(offset), timeout=600, metadata=self._md()))
            except grpc.RpcError as exc:
                code = exc.code()
                self._final(exc)
                if code in _REFUSED:
                    self.bytes_up += sent
                    self.bytes_resent += max(0, sent - size)
                    return False, exc.details() or code.name
                if code == grpc.StatusCode.ABORTED:
                    self._rejoin()
                elif retryable(exc, _UPLOAD_RETRYABLE) or (cut and code == grpc.StatusCode.UNKNOWN):
                    if time.time() - start > self.patience_s or attempt > 50:
                        raise CoordinatorGone(f"upload of task {task.task_id} failed {attempt + 1} times ({code.name}: {exc.details()})") from None
                    log.info("upload of task %s interrupted at ~%d bytes (%s); resuming", task.task_id, sent, code.name)
                    time.sleep(backoff_s(attempt) if code != grpc.StatusCode.DATA_LOSS else 0.0)
                    attempt += 1
                else:
                    raise
                offset = self.query_upload(task.task_id)
                continue
            if not ack.accepted and ack.reason == "incomplete":
                offset = int(ack.received)
                continue
            self.bytes_up += sent
            self.bytes_resent += max(0, sent - size)
            if self.bytes_resent:
                log.info("task %s uploaded; %d bytes re-sent", task.task_id, self.bytes_resent)
            return bool(ack.accepted), ack.reason

    def status(self) -> dict[str, Any]:
        """The coordinator's status (workers, round, progress)."""
        reply = self._call(lambda: self._rpc["Status"](serde.status_request_to_proto(), timeout=10, metadata=self._md()), rejoin=False)
        return dataclasses.asdict(serde.status_from_proto(reply))

    def leave(self) -> None:
        self._closed.set()
        try:
            if self.session:
                self._rpc["Leave"](serde.leave_to_proto(self._session_call()), timeout=5, metadata=self._md())
        except grpc.RpcError:
            pass
        self.channel.close()
