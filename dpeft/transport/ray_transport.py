"""Ray coordinator transport: workers are Ray actors, payloads move through the object store.

The round engine is unchanged: it publishes one encoded global adapter per round
(``publish_blob`` puts it into the object store ONCE as a ``uint8`` array, so every actor on a
node maps the same shared-memory copy), submits tasks (each becomes one actor method call
returning an object ref), and pulls events with ``next_event`` (``ray.wait`` over the refs in
flight, so updates stream into the aggregator as they finish). Uploads are decoded and
validated through the engine's decoder factory, exactly as the gRPC servicer does.

Scheduling: each actor runs one task at a time; the transport keeps the queue (the shared
:class:`~dpeft.transport.queue.TaskQueue`, as the gRPC transport does) and hands the next task
to whichever actor becomes idle (so ``cancel_pending`` can drop queued tasks and a slow actor
never hoards work). The actors are a :class:`~dpeft.transport.ray_pool.RayActorPool` (one
placement-group bundle per actor holding its CPUs, GPUs and custom resources) and are listed
in the shared :class:`~dpeft.transport.registry.WorkerRegistry`.

Faults use Ray's own mechanisms: actors are created with ``max_restarts`` (Ray re-runs the
constructor, which reloads the base) and optionally ``max_task_retries``. When a call fails
because its actor died, the task goes back to the front of the queue (up to ``max_attempts``
tries) and is picked up by the next idle actor; a restarted actor is probed with ``ready`` and
rejoins the pool; an actor out of restarts is marked dead. After ``max_attempts`` the task is
reported to the engine as a :class:`Rejection` (reason ``worker_died``), which the sync policy
treats like any other missing update.

Payloads: a published payload stays in the object store while a queued or running task refers
to it, while it belongs to the newest round that tasks were submitted for (the engine reuses a
round's payloads for later dispatches: async refills, re-assigned tasks, one payload per
flexlora client rank), and while it is among the newest ``keep_blobs``; after that the driver
drops its reference and Ray frees it. ``forget_tasks`` (tasks the engine gave up on) drops
them from the queue and discards a running one's result.

Lockstep (``train.lockstep``): an idle actor gets up to ``train.lockstep_clients`` queued
tasks of one round in one call (``train_many``; its fair share: ceil(that round's queued tasks /
idle actors)) and trains them together over its shared base, as a gRPC worker does with
``PollRequest.max_tasks``. Results, failures and re-queues stay per task.

Evaluation tasks (``TrainTask.kind`` "evaluate", federated evaluation) go through the same
queue to actors whose class declares that kind (``actor_cls.task_kinds``); the actor evaluates
instead of training and its empty payload is decoded like any update.

Simulated heterogeneity (``simulate.*``, as in ``dpeft simulate`` workers): a task drawn for
``simulate.dropout`` is never run and gets no reply (the engine's ``sync.task_timeout_s``
notices); a client with ``simulate.speed_factors`` factor ``f`` has its result held back
``(f - 1) x`` its compute time while its actor already trains the next task; byzantine
clients are corrupted by the worker runtime itself.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from dpeft.codec.spool import SpooledBlob
from dpeft.config.schema import TransportConfig
from dpeft.errors import DpeftError, ProtocolError, RejectedUpdate
from dpeft.transport.base import CoordinatorTransport, DecoderFactory, Event, Rejection, TaskResult, TrainTask
from dpeft.transport.queue import Assignment, TaskQueue
from dpeft.transport.ray_calls import ActorCall, ActorSlot, NoHeterogeneity, compute_s
from dpeft.transport.ray_pool import RayActorPool, RayActorSpec, short_error
from dpeft.transport.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger("dpeft.transport.ray")

__all__ = ["RayActorSpec", "RayCoordinatorTransport"]


class RayCoordinatorTransport(CoordinatorTransport):
    """Runs tasks on Ray actors; results come back as object refs consumed with ``ray.wait``."""

    #: payloads kept beyond those a queued or in-flight task refers to
    keep_blobs = 2

    def __init__(
        self,
        *,
        config_tree: dict[str, Any],
        decoder_factory: DecoderFactory,
        spec: RayActorSpec | None = None,
        settings: TransportConfig | None = None,
        actor_cls: type,
        heterogeneity: Any = None,
        cores: str | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise DpeftError("Ray is not initialised: call ray.init(...) before starting the Ray transport")
        self.ray = ray
        self.config_tree = config_tree
        self.decoder_factory = decoder_factory
        self.spec = spec or RayActorSpec()
        self.settings = settings or TransportConfig()  # of its tunables only max_update_bytes applies to Ray
        self.actor_cls = actor_cls  # the worker service's actor (``dpeft_workers.ray_actor.TrainActor``)
        self.cores = cores  # a core budget file the actors share (slot i for actor i), or None
        # task kinds besides training the actors run (evaluation tasks go to actors that declare them)
        self.task_kinds = list(getattr(actor_cls, "task_kinds", ()))
        # simulated drops and slow replies wrap the real actors here (``drops(task)``, ``delay_s(client, compute_s)``)
        self.sim = heterogeneity if heterogeneity is not None else NoHeterogeneity()
        train = config_tree.get("train") or {}
        # train.lockstep: hand an idle actor several tasks of a round at once (trained together)
        self.lockstep_clients = int(train.get("lockstep_clients") or 1) if train.get("lockstep") else 1
        self.pool = RayActorPool(self.spec, actor_cls)
        self.registry = WorkerRegistry()
        self.queue = TaskQueue()
        self._actors: OrderedDict[str, ActorSlot] = OrderedDict()
        self._blobs: OrderedDict[str, Any] = OrderedDict()
        self._blob_sizes: dict[str, int] = {}
        # simulated slow clients: (release time, seq, task, actor, actor's result, delay)
        self._delayed: list[tuple[float, int, TrainTask, ActorSlot, Any, float]] = []
        self._seq = itertools.count()
        self._calls: dict[Any, ActorCall] = {}
        self._events: deque[Event] = deque()
        self._bytes_up = 0
        self._bytes_down = 0

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> str:
        if self.spec.actors < 1:
            raise DpeftError("the Ray transport needs at least one actor")
        slots = itertools.count()
        members = self.pool.start(
            lambda worker_id, threads: (
                self.config_tree,
                worker_id,
                threads,
                *([(self.cores, next(slots))] if self.cores else []),
            )
        )
        now = time.time()
        for m in members:
            record = self.registry.add(
                WorkerRecord(m.worker_id, joined=now, last_seen=now, alive=True, task_kinds=list(self.task_kinds))
            )
            self._actors[m.worker_id] = ActorSlot(m, record)
        self.pool.wait_ready()
        ctx = self.ray.get_runtime_context()
        return f"ray:{ctx.gcs_address}"

    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        log.info("stopping %d Ray actors: %s", len(self._actors), reason)
        self.pool.shutdown()
        for a in self._actors.values():
            a.record.alive = False
        self._calls.clear()
        self.queue.clear_pending()
        self.queue.clear_inflight()
        self.queue.forget_payloads()
        self._delayed.clear()
        self._blobs.clear()
        self._blob_sizes.clear()

    # -- engine-facing ---------------------------------------------------------
    def publish_blob(self, blob_id: str, payload: bytes | SpooledBlob) -> None:
        """Put a payload into the object store once (as a uint8 array: zero-copy reads on each node)."""
        if blob_id not in self._blobs:
            if isinstance(payload, SpooledBlob):  # the object store needs one buffer
                payload = payload.tobytes()
            self._blobs[blob_id] = self.ray.put(np.frombuffer(payload, dtype=np.uint8))
            self._blob_sizes[blob_id] = len(payload)

    def _prune_blobs(self) -> None:
        """Release payloads no task needs (:meth:`TaskQueue.prunable`); Ray frees them."""
        for name in self.queue.prunable(list(self._blobs), self.keep_blobs):
            del self._blobs[name]
            self._blob_sizes.pop(name, None)

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        self.queue.submit(tasks)
        self._prune_blobs()
        self._dispatch()

    def forget_tasks(self, task_ids: list[str]) -> None:
        """The engine gave up on these tasks: drop them from the queue; a running or held-back result is discarded."""
        drop = set(task_ids)
        self.queue.forget(drop)
        if any(d[2].task_id in drop for d in self._delayed):
            self._delayed = [d for d in self._delayed if d[2].task_id not in drop]
            heapq.heapify(self._delayed)
        self._prune_blobs()

    def _dispatch(self) -> None:
        """Hand queued tasks to idle actors: one each, or with lockstep a fair share of a round's tasks."""
        idle = [a for a in self._actors.values() if a.member.alive and not a.busy and not a.probing]
        for n, a in enumerate(idle):
            if not self.queue.pending_count:
                return
            payloads: list[Any] = []

            def accept(task: TrainTask, attempt: int, a: ActorSlot = a, payloads: list[Any] = payloads) -> bool:
                if attempt == 1 and self.sim.drops(task):  # drawn per (seed, round, client, attempt, dispatch), as in simulate
                    log.info("simulated dropout: task %s gets no reply", task.task_id)
                    return False
                blob = self._blobs.get(task.blob_id)
                if blob is None:
                    self._events.append(
                        Rejection(task.task_id, a.worker_id, "unknown_blob", f"payload {task.blob_id} was dropped")
                    )
                    return False
                payloads.append(blob)
                if task.blob_id not in a.blobs_seen:  # counted once per actor and payload (the store ships it once per node)
                    a.blobs_seen = (a.blobs_seen & set(self._blobs)) | {task.blob_id}
                    a.record.bytes_down += self._blob_sizes.get(task.blob_id, 0)
                    self._bytes_down += self._blob_sizes.get(task.blob_id, 0)
                return True

            taken = self.queue.take(
                a.worker_id, max_tasks=self.lockstep_clients, idle_hosts=len(idle) - n, accept=accept, kinds=self.task_kinds
            )
            if not taken:
                continue
            a.busy = True
            if len(taken) == 1:
                ref = a.handle.train.remote(taken[0].task, payloads[0])
            else:  # payload refs as top-level arguments, so Ray resolves each (zero-copy) before the call
                ref = a.handle.train_many.remote([x.task for x in taken], *payloads)
            self._calls[ref] = ActorCall(a, taken)

    def next_event(self, timeout: float) -> Event | None:
        deadline = time.time() + timeout
        while True:
            self._release_delayed()
            self._dispatch()
            if self._events:
                return self._events.popleft()
            now = time.time()
            left = deadline - now
            wait = left if not self._delayed else min(left, self._delayed[0][0] - now)
            if not self._calls:
                if left > 0:
                    time.sleep(max(0.0, min(wait, 0.05)))
                    continue
                return None
            ready, _ = self.ray.wait(list(self._calls), num_returns=1, timeout=max(0.0, wait))
            for ref in ready:
                self._complete(ref)
            self._release_delayed()
            if self._events:
                return self._events.popleft()
            if time.time() >= deadline:
                return None

    def _release_delayed(self) -> None:
        """Deliver held-back results of simulated slow clients whose time has come."""
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, task, a, value, delay = heapq.heappop(self._delayed)
            self._events.append(self._decode(task, a, value, {"simulated_delay_s": delay}))

    def _wanted(self, call: ActorCall) -> list[Assignment]:
        """The call's tasks still in flight on its actor (not forgotten by the engine meanwhile); they leave the queue."""
        out = [x for x in call.assignments if self.queue.owner(x.task.task_id) == call.actor.worker_id]
        for x in out:
            self.queue.finish(x.task.task_id)
        return out

    def _complete(self, ref: Any) -> None:
        ray = self.ray
        call = self._calls.pop(ref)
        a = call.actor
        a.record.last_seen = time.time()
        try:
            value = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._actor_failed(call, exc)
            return
        except ray.exceptions.RayError as exc:
            a.busy = a.probing = False
            for x in self._wanted(call):
                log.warning("task %s failed on %s: %s", x.task.task_id, a.worker_id, short_error(exc))
                self._events.append(Rejection(x.task.task_id, a.worker_id, "worker_error", short_error(exc)))
            return
        if not call.assignments:  # probe answered: the (restarted) actor is back
            a.probing = False
            a.record.alive = True
            self.pool.back(a.member, value)
            return
        a.busy = False
        tasks = call.tasks
        a.record.tasks_done += len(tasks)
        wanted = {x.task.task_id for x in self._wanted(call)}
        if len(tasks) > 1:
            if not isinstance(value, (list, tuple)) or len(value) != len(tasks):
                for task in tasks:
                    self._events.append(
                        Rejection(task.task_id, a.worker_id, "malformed", "train_many returned the wrong number of results")
                    )
                return
            results = list(zip(tasks, value, strict=True))
        else:
            results = [(tasks[0], value)]
        for task, result in results:
            if task.task_id not in wanted:
                continue
            delay = self.sim.delay_s(task.client_id, compute_s(result))
            if delay > 0:  # a simulated slow client: the actor is free, the reply comes later
                heapq.heappush(self._delayed, (time.time() + delay, next(self._seq), task, a, result, delay))
                continue
            self._events.append(self._decode(task, a, result))

    def _decode(self, task: TrainTask, a: ActorSlot, value: Any, extra: dict[str, float] | None = None) -> Event:
        try:
            update, num_examples, metrics = value
            buf = np.ascontiguousarray(update, dtype=np.uint8).data.cast("B")
            if len(buf) > self.settings.max_update_bytes:
                raise RejectedUpdate("too_large", f"{len(buf)} bytes exceeds the limit of {self.settings.max_update_bytes}")
            decoder = self.decoder_factory(task.task_id, task.client_id)
            decoder.feed(buf)
            state = decoder.finish()
        except ProtocolError as exc:
            return Rejection(task.task_id, a.worker_id, "malformed", str(exc))
        except RejectedUpdate as exc:
            log.log(
                logging.INFO if exc.routine else logging.WARNING,
                "rejected update worker=%s task=%s: %s",
                a.worker_id,
                task.task_id,
                exc,
            )
            return Rejection(task.task_id, a.worker_id, exc.reason, str(exc))
        except (TypeError, ValueError) as exc:
            return Rejection(task.task_id, a.worker_id, "malformed", f"unexpected result from actor: {exc}")
        a.record.bytes_up += len(buf)
        self._bytes_up += len(buf)
        return TaskResult(
            task_id=task.task_id,
            client_id=task.client_id,
            worker_id=a.worker_id,
            delta=state,
            num_examples=int(num_examples),
            metrics={**{k: float(v) for k, v in dict(metrics).items()}, **(extra or {})},
            bytes_up=len(buf),
        )

    def _actor_failed(self, call: ActorCall, exc: Exception) -> None:
        """A call failed because its actor died: re-queue its tasks, then probe until the actor is back."""
        a = call.actor
        a.busy = False
        a.probing = False
        mine = [x for x in call.assignments if self.queue.owner(x.task.task_id) == a.worker_id]
        retry = []
        for x in mine:  # back to the front of the queue, in their order
            log.warning(
                "Ray actor %s failed during task %s (attempt %d): %s", a.worker_id, x.task.task_id, x.attempt, short_error(exc)
            )
            if x.attempt < self.spec.max_attempts:
                retry.append(x)
            else:
                self.queue.finish(x.task.task_id)
                self._events.append(
                    Rejection(x.task.task_id, a.worker_id, "worker_died", f"{x.attempt} attempts failed: {short_error(exc)}")
                )
        self.queue.requeue(retry, next_attempt=True)
        if not self.pool.call_failed(a.member, exc, probing=not call.assignments):
            a.record.alive = False
            return
        # restarting or briefly unreachable: the probe answers once Ray has it back, fails at once if it is gone
        self._probe(a)

    def _probe(self, a: ActorSlot) -> None:
        """Ask a (restarting) actor for ``ready``; it takes no task until that answers."""
        a.probing = True
        self._calls[a.handle.ready.remote()] = ActorCall(a)

    def cancel_pending(self) -> list[str]:
        """Drop queued tasks; tasks already running finish and are delivered (the engine decides: late, fold, ...)."""
        return self.queue.clear_pending()

    def workers(self) -> dict[str, dict[str, Any]]:
        for a in self._actors.values():
            a.record.extra = {
                "busy": a.busy,
                "restarting": a.probing,
                "restarts": a.member.restarts,
                "pid": a.member.info.get("pid"),
                "node_ip": a.member.info.get("node_ip"),
            }
        return self.registry.snapshot()

    def bytes_moved(self) -> tuple[int, int]:
        return self._bytes_up, self._bytes_down

    # -- for tests and tools ---------------------------------------------------
    def actor_handles(self) -> dict[str, Any]:
        """worker id -> Ray actor handle."""
        return {k: a.handle for k, a in self._actors.items()}

    def in_flight(self) -> dict[str, str]:
        """task id -> worker id of the tasks currently running."""
        return self.queue.in_flight()
