"""gRPC coordinator transport: serves the Coordinator service; workers dial in.

It holds no aggregation logic: the shared :class:`~dpeft.transport.queue.TaskQueue` and
:class:`~dpeft.transport.registry.WorkerRegistry`, the published payloads
(:mod:`.payloads`) and the partial uploads (:mod:`.uploads`), behind the RPC handlers of
:mod:`.servicer`. What faces the network:

- authentication: with a :class:`~dpeft.transport.auth.TokenStore`, every call must carry a
  (worker id, bearer token) pair in its metadata; an interceptor refuses bad ones with
  UNAUTHENTICATED before the handler runs, and the handler checks that the worker id in the
  request is the one the token was issued for (PERMISSION_DENIED otherwise). A worker whose
  token is revoked (its id removed from the tokens file) gets every call refused, so its tasks
  go back to the queue at the first refused call, not after ``dead_after_s``. TLS (optionally
  mutual) through server credentials.
- limits: declared update size, bytes per tensor, concurrent uploads.
- liveness: a worker not seen for ``dead_after_s`` is marked dead and its in-flight tasks go
  back to the front of the queue (another worker takes them); a worker that comes back is alive
  again. Workers that do nothing else send Heartbeat.
- wire integrity: CRC-32C per chunk and for the whole payload (CRC-32 with older peers). Every
  task this coordinator hands out carries ``TrainTask.blob_crc32c`` (the published payload's
  CRC-32C), which is how a worker learns the coordinator speaks CRC-32C.
- bad updates: every rejection is a precise gRPC status + message, logged as one structured
  line, and reported to the engine as a :class:`Rejection`; nothing reaches the aggregate.
- restarts: the registry of workers (their client ids) is kept in ``registry_path`` so a
  restarted coordinator hands every worker the same clients; sessions are per process, so a
  worker calling with an old session gets ABORTED ("join again") and re-joins by itself.
- a worker id joining again with a new session (its process was restarted, maybe before it was
  declared dead): the old session is over, so the tasks it held go back to the front of the
  queue at once; an upload still arriving under the old session is refused (ABORTED) like any
  stale session's.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dpeft.config.schema import TransportConfig
from dpeft.transport.auth import AuthInterceptor, TokenStore
from dpeft.transport.base import Blob, CoordinatorTransport, DecoderFactory, Event, Rejection, TaskResult, TrainTask
from dpeft.transport.events import log_event
from dpeft.transport.grpc.channel import SERVICE_NAME, channel_options
from dpeft.transport.grpc.payloads import PayloadStore
from dpeft.transport.grpc.servicer import CoordinatorServicer, StaleSession, add_servicer
from dpeft.transport.grpc.uploads import UploadTable
from dpeft.transport.messages import CoordinatorStatus, JoinAnswer, PollAnswer, WorkerJoin, WorkerState
from dpeft.transport.queue import TaskQueue
from dpeft.transport.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger("dpeft.transport.grpc")


class GrpcCoordinatorTransport(CoordinatorTransport):
    """Serves the Coordinator service and the standard gRPC health service."""

    #: payloads kept beyond those a queued or in-flight task refers to
    keep_blobs = 2

    def __init__(
        self,
        listen: str,
        settings: TransportConfig,
        *,
        run_id: str,
        config_yaml: str,
        num_clients: int,
        decoder_factory: DecoderFactory,
        tokens: TokenStore | None = None,
        credentials: grpc.ServerCredentials | None = None,
        registry_path: str | os.PathLike[str] | None = None,
        total_rounds: int = 0,
        authenticate: Callable[[str, str], bool] | None = None,
    ) -> None:
        """``settings`` holds the tunables (the ``transport:`` section of the run config; its
        ``spool_*`` fields are the engine's); the rest is this run's identity and security."""
        self.listen = listen
        self.settings = settings
        self.run_id = run_id
        self.config_yaml = config_yaml
        self.decoder_factory = decoder_factory
        self.authenticate = authenticate or (lambda worker_id, token: True)
        self.tokens = tokens
        self.credentials = credentials
        self.total_rounds = total_rounds
        self.started = time.time()
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.registry = WorkerRegistry(num_clients, registry_path)
        self.queue = TaskQueue()
        self.payloads = PayloadStore(settings.chunk_bytes)
        self.uploads = UploadTable(settings.max_concurrent_uploads, settings.resume_window_s)
        self.stop_reason: str | None = None
        self._round_stats: dict[int, list[int]] = {}
        self._events: queue.Queue[Event] = queue.Queue()
        self._bytes_up = 0
        self._bytes_down = 0
        self.counters = {"uploads_resumed": 0, "corrupt_chunks": 0, "rejected": 0}
        self._reaper_stop = threading.Event()
        if self.registry.load():
            log_event("registry_loaded", workers=len(self.registry))
        interceptors = [AuthInterceptor(tokens.check, self._on_refused)] if tokens is not None else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.server_threads, thread_name_prefix="dpeft-grpc"),
            options=channel_options(settings.chunk_bytes),
            interceptors=interceptors,
        )
        add_servicer(CoordinatorServicer(self), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port: int | None = None

    @property
    def current_round(self) -> int:
        return self.queue.current_round or 0

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
        with self.cond:
            self.stop_reason = reason
            self.cond.notify_all()
        log_event("shutdown", reason=reason)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            with self.lock:
                if not self.registry.any_active():
                    break
            time.sleep(0.05)
        self._reaper_stop.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace=0.5).wait()

    def _on_refused(self, method: str, worker_id: str, message: str) -> None:
        """The auth interceptor refused a call. A known worker whose token was revoked can do
        nothing more (its Leave is refused too): its tasks go back to the queue now. A wrong
        token for a worker id still in the tokens file (which anyone could send) takes nothing away."""
        log_event("auth_refused", level=logging.WARNING, method=method, worker=worker_id or "?", detail=message)
        if method == "PushUpdate":
            with self.lock:
                self.counters["rejected"] += 1
            self._events.put(Rejection(task_id="?", worker_id=worker_id or "?", reason="unauthenticated", detail=message))
        if not worker_id or self.tokens is None or self.tokens.knows(worker_id):
            return
        n = self._retire(worker_id, only_active=True)
        if n is not None:
            log_event("worker_revoked", level=logging.WARNING, worker=worker_id, requeued=n)

    def worker_gone(self, worker_id: str, reason: str) -> int:
        """A worker known to be gone (its process died): its in-flight tasks go back to the queue
        now, not after ``dead_after_s``; returns how many. A worker joining again under that id
        starts a new session."""
        n = self._retire(worker_id) or 0
        log_event("worker_dead", level=logging.WARNING, worker=worker_id, reason=reason, requeued=n)
        return n

    def _retire(self, worker_id: str, only_active: bool = False) -> int | None:
        """Mark a worker not alive and re-queue its in-flight tasks; None when ``only_active`` and it was not."""
        with self.cond:
            record = self.registry.get(worker_id)
            if only_active and (record is None or not record.active):
                return None
            if record is not None:
                record.alive = False
                record.current_task = ""
            n = self.queue.requeue_worker(worker_id)
            self.cond.notify_all()
        return n

    # -- liveness -----------------------------------------------------------------
    def _reaper(self) -> None:
        tick = max(0.05, min(1.0, self.settings.dead_after_s / 4))
        while not self._reaper_stop.wait(tick):
            now = time.time()
            with self.cond:
                for record in self.registry.silent(now, self.settings.dead_after_s):
                    n = self.queue.requeue_worker(record.worker_id)
                    log_event("worker_dead", level=logging.WARNING, worker=record.worker_id, silent_s=now - record.last_seen, requeued=n)
                    self.cond.notify_all()
            for task_id, received in self.uploads.expire(now):
                log_event("upload_expired", task=task_id, received=received)

    # -- servicer-facing -----------------------------------------------------------
    def session_worker(self, worker_id: str, session: str) -> WorkerRecord:
        """The record of a worker calling with ``session`` (a sign of life); StaleSession otherwise."""
        with self.cond:
            record = self.registry.get(worker_id)
            if record is None or not record.session or record.session != session:
                known = record is not None and bool(record.session)
                msg = "stale session (the worker joined again elsewhere)" if known else "unknown session (coordinator restarted?)"
                raise StaleSession(f"worker {worker_id!r}: {msg}; join again")
            if self.registry.seen(record, time.time()):
                log_event("worker_back", worker=worker_id)
                self.cond.notify_all()
            return record

    def join(self, request: WorkerJoin, peer: str) -> JoinAnswer:
        """Register a worker (NoFreeClientSlot when it brings data and every slot is held).

        A join under a known worker id ends its previous session of this coordinator process:
        the tasks that session held are re-queued now (another process, or this one, runs them)."""
        session = secrets.token_hex(8)
        with self.cond:
            record, prev = self.registry.join(
                request.worker_id, session, request.own_data, request.own_examples, peer, time.time(), task_kinds=request.task_kinds
            )
            replaced = prev is not None and bool(prev.session) and not prev.left
            requeued = self.queue.requeue_worker(request.worker_id) if replaced else 0
            self.cond.notify_all()
        if requeued or (prev is not None and prev.active and prev.session):
            log_event("session_replaced", level=logging.WARNING if requeued else logging.INFO, worker=request.worker_id, requeued=requeued)
        log_event("worker_joined", worker=request.worker_id, own_data=request.own_data, clients=record.client_ids, peer=peer, rejoin=prev is not None)
        return JoinAnswer(self.run_id, session, self.config_yaml, list(record.client_ids), self.settings.heartbeat_s)

    def poll(self, record: WorkerRecord, max_tasks: int, still_waiting: Callable[[], bool]) -> PollAnswer:
        """Tasks for ``record`` (waiting up to ``poll_timeout_s`` for some), or wait / stop."""
        deadline = time.time() + self.settings.poll_timeout_s
        with self.cond:
            while True:
                if self.stop_reason is not None:
                    return PollAnswer(stop_reason=self.stop_reason)
                idle = self.registry.idle_virtual_hosts(record.worker_id, self.queue.busy_workers()) if max_tasks > 1 else 1
                taken = self.queue.take(record.worker_id, own_data=record.own_data, max_tasks=max_tasks, idle_hosts=idle, kinds=record.task_kinds)
                if taken:
                    record.current_task = ",".join(a.task.task_id for a in taken)
                    for a in taken:
                        log_event("task_assigned", level=logging.DEBUG, worker=record.worker_id, task=a.task.task_id, round=a.task.round)
                    return PollAnswer(tasks=[self._with_crc32c(a.task) for a in taken])
                left = deadline - time.time()
                if left <= 0 or not still_waiting():
                    return PollAnswer(wait_s=0.05)
                self.cond.wait(min(left, 0.5))
                record.last_seen = time.time()

    def _with_crc32c(self, task: TrainTask) -> TrainTask:
        """``task`` as handed to a worker: with its payload's CRC-32C (which also tells the worker
        that this coordinator speaks CRC-32C)."""
        crc = self.payloads.whole_crc32c(task.blob_id)
        return task if crc is None else replace(task, blob_crc32c=crc)

    def leave(self, record: WorkerRecord) -> None:
        with self.cond:
            self.registry.mark_left(record)
            n = self.queue.requeue_worker(record.worker_id)
            self.cond.notify_all()
        log_event("worker_left", worker=record.worker_id, requeued=n)

    def count(self, up: int = 0, down: int = 0, record: WorkerRecord | None = None) -> None:
        with self.lock:
            self._bytes_up += up
            self._bytes_down += down
            if record is not None:
                record.bytes_up += up
                record.bytes_down += down
                record.last_seen = time.time()

    def count_event(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    def deliver(self, event: Event) -> None:
        """Hand an upload's outcome to the engine (a result finishes its task in the queue)."""
        if isinstance(event, TaskResult):
            with self.lock:
                done = self.queue.finish(event.task_id)
                if done is not None and done.task.round in self._round_stats:
                    self._round_stats[done.task.round][1] += 1
                record = self.registry.get(event.worker_id)
                if record is not None:
                    record.tasks_done += 1
                    record.current_task = ""
        else:
            self.count_event("rejected")
        self._events.put(event)

    def status(self) -> CoordinatorStatus:
        with self.lock:
            submitted, done = self._round_stats.get(self.current_round, [0, 0])
            workers = [
                WorkerState(
                    worker_id=r.worker_id,
                    state=r.state,
                    last_seen=r.last_seen,
                    tasks_done=r.tasks_done,
                    bytes_up=r.bytes_up,
                    bytes_down=r.bytes_down,
                    own_data=r.own_data,
                    client_ids=list(r.client_ids),
                    current_task=r.current_task,
                    address=r.address,
                )
                for r in sorted(self.registry, key=lambda r: r.worker_id)
            ]
            return CoordinatorStatus(
                run_id=self.run_id,
                round=self.current_round,
                total_rounds=self.total_rounds,
                tasks_submitted=submitted,
                tasks_done=done,
                tasks_pending=self.queue.pending_count,
                tasks_inflight=self.queue.inflight_count,
                uploads_partial=len(self.uploads),
                bytes_up=self._bytes_up,
                bytes_down=self._bytes_down,
                rejected=self.counters["rejected"],
                stop_reason=self.stop_reason or "",
                uptime_s=time.time() - self.started,
                workers=workers,
            )

    # -- engine-facing ---------------------------------------------------------
    def publish_blob(self, blob_id: str, payload: Blob) -> None:
        """Publish a payload (framed once for every download; see :class:`~.payloads.PayloadStore`)."""
        self.payloads.publish(blob_id, payload)

    def _prune_blobs(self) -> None:
        self.payloads.drop(self.queue.prunable(self.payloads.names(), self.keep_blobs))

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        with self.cond:
            self.queue.submit(tasks, pinned)
            for t in tasks:
                self._round_stats.setdefault(t.round, [0, 0])[0] += 1
            self.uploads.allow_again(t.task_id for t in tasks)  # a re-submitted task may be uploaded again
            for r in [r for r in self._round_stats if r < self.current_round - 5]:
                del self._round_stats[r]
            self._prune_blobs()
            self.cond.notify_all()
        if tasks:
            log_event("tasks_submitted", round=tasks[0].round, count=len(tasks))

    def forget_tasks(self, task_ids: list[str]) -> None:
        with self.lock:
            self.queue.forget(task_ids)
            for tid in task_ids:
                self.uploads.drop(tid)
            self._prune_blobs()

    def next_event(self, timeout: float) -> Event | None:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def cancel_pending(self) -> list[str]:
        with self.lock:
            ids = self.queue.clear_pending()
            self.queue.clear_inflight()
            self.uploads.clear()
            for record in self.registry:
                record.current_task = ""
            return ids

    def workers(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return self.registry.snapshot()

    def bytes_moved(self) -> tuple[int, int]:
        with self.lock:
            return self._bytes_up, self._bytes_down

    def stats(self) -> dict[str, int]:
        """Transport counters (uploads resumed, corrupt chunks, rejections, partial uploads held)."""
        with self.lock:
            return {**self.counters, "uploads_partial": len(self.uploads)}
