"""Ray coordinator transport: workers are Ray actors, payloads move through the object store.

The round engine is unchanged: it publishes one encoded global adapter per round
(``publish_blob`` puts it into the object store ONCE as a ``uint8`` array, so every actor on a
node maps the same shared-memory copy), submits tasks (each becomes one actor method call
returning an object ref), and pulls events with ``next_event`` (``ray.wait`` over the refs in
flight, so updates stream into the aggregator as they finish). Uploads are decoded and
validated through the engine's decoder factory, exactly as the gRPC servicer does.

Scheduling: each actor runs one task at a time; the transport keeps the queue and hands the
next task to whichever actor becomes idle (so ``cancel_pending`` can drop queued tasks and a
slow actor never hoards work). Actors are placed with a placement group (one bundle per actor
holding its CPUs, GPUs and custom resources).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpeft.codec.spool import SpooledBlob
from dpeft.errors import DpeftError, ProtocolError, RejectedUpdate
from dpeft.transport.base import CoordinatorTransport, DecoderFactory, Event, Rejection, TaskResult, TrainTask
from dpeft.workers.simulate import Heterogeneity

log = logging.getLogger("dpeft.transport.ray")


@dataclass(kw_only=True)
class RayActorSpec:
    """How many actors and what each one reserves."""

    actors: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    placement_strategy: str | None = "PACK"
    max_restarts: int = 2
    max_task_retries: int = 0
    max_attempts: int = 3
    startup_timeout_s: float = 600.0

    def bundle(self) -> dict[str, float]:
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), **{k: float(v) for k, v in self.resources.items()}}
        return {k: v for k, v in out.items() if v > 0}

    def torch_threads(self) -> int:
        return int(self.threads) if self.threads else max(1, int(self.num_cpus))


@dataclass
class _Actor:
    worker_id: str
    handle: Any
    alive: bool = True
    busy: bool = False
    probing: bool = False
    restarts: int = 0  # failures seen (each restart of the actor shows up as one)
    deaths: int = 0
    probe_failures: int = 0  # in a row
    tasks_done: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    blobs_seen: set[str] = field(default_factory=set)
    info: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.time)


@dataclass
class _Call:
    actor: _Actor
    task: TrainTask | None  # None: a readiness probe
    attempt: int = 1
    cancelled: bool = False
    more: list[TrainTask] = field(default_factory=list)  # a lockstep call: further tasks, trained together
    dropped: set[str] = field(default_factory=set)  # tasks of a lockstep call the engine gave up on

    @property
    def tasks(self) -> list[TrainTask]:
        return [] if self.task is None else [self.task, *self.more]

    def wanted(self, task: TrainTask) -> bool:
        return not self.cancelled and task.task_id not in self.dropped


class RayCoordinatorTransport(CoordinatorTransport):
    """Runs tasks on Ray actors; results come back as object refs consumed with ``ray.wait``."""

    def __init__(
        self,
        *,
        config_tree: dict[str, Any],
        decoder_factory: DecoderFactory,
        spec: RayActorSpec | None = None,
        max_update_bytes: int = 1 << 31,
        actor_cls: type | None = None,
        heterogeneity: Heterogeneity | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise DpeftError("Ray is not initialised: call ray.init(...) before starting the Ray transport")
        self.ray = ray
        self.config_tree = config_tree
        self.decoder_factory = decoder_factory
        self.spec = spec or RayActorSpec()
        self.max_update_bytes = max_update_bytes
        if actor_cls is None:
            from dpeft.workers.ray_actor import TrainActor

            actor_cls = TrainActor
        self.actor_cls = actor_cls
        if heterogeneity is None:
            from dpeft.validate import config_from_dict

            heterogeneity = Heterogeneity(config_from_dict(config_tree))
        self.sim = heterogeneity
        train = config_tree.get("train") or {}
        # train.lockstep: hand an idle actor several tasks of a round at once (trained together)
        self.lockstep_clients = int(train.get("lockstep_clients") or 1) if train.get("lockstep") else 1
        self._actors: OrderedDict[str, _Actor] = OrderedDict()
        self._blobs: OrderedDict[str, Any] = OrderedDict()
        self._blob_sizes: dict[str, int] = {}
        self._blob_round: dict[str, int] = {}  # payload -> newest round a submitted task used it for
        self._latest_round: int | None = None
        # simulated slow clients: (release time, seq, task, actor, actor's result, delay)
        self._delayed: list[tuple[float, int, TrainTask, _Actor, Any, float]] = []
        self._seq = itertools.count()
        self._pending: deque[tuple[TrainTask, int]] = deque()
        self._calls: dict[Any, _Call] = {}
        self._events: deque[Event] = deque()
        self._bytes_up = 0
        self._bytes_down = 0
        self._pg: Any = None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> str:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.spec
        if spec.actors < 1:
            raise DpeftError("the Ray transport needs at least one actor")
        strategies: list[Any] = [None] * spec.actors
        if spec.placement_strategy and spec.bundle():
            from ray.util.placement_group import placement_group

            self._pg = placement_group([spec.bundle() for _ in range(spec.actors)], strategy=spec.placement_strategy)
            ready, _ = ray.wait([self._pg.ready()], timeout=spec.startup_timeout_s)
            if not ready:
                raise DpeftError(
                    f"Ray could not reserve {spec.actors} x {spec.bundle()} within {spec.startup_timeout_s:.0f}s "
                    f"(cluster resources: {ray.cluster_resources()}); lower ray.actors or the per-actor resources"
                )
            strategies = [PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=i) for i in range(spec.actors)]
        remote_cls = ray.remote(self.actor_cls)
        threads = spec.torch_threads()
        env = {"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
        for i in range(spec.actors):
            worker_id = f"ray-{i}"
            options: dict[str, Any] = dict(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                resources=dict(spec.resources) or None,
                max_restarts=spec.max_restarts,
                max_task_retries=spec.max_task_retries,
                runtime_env=env,
                name=None,
            )
            if strategies[i] is not None:
                options["scheduling_strategy"] = strategies[i]
            handle = remote_cls.options(**options).remote(self.config_tree, worker_id, threads)
            self._actors[worker_id] = _Actor(worker_id, handle)
        refs = {a.handle.ready.remote(): a for a in self._actors.values()}
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=spec.startup_timeout_s)
        if not_ready:
            raise DpeftError(f"{len(not_ready)} of {len(refs)} Ray actors did not start within {spec.startup_timeout_s:.0f}s")
        for ref in ready:
            try:
                refs[ref].info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise DpeftError(f"Ray actor {refs[ref].worker_id} failed to start: {_short(exc)}") from None
        ctx = ray.get_runtime_context()
        return f"ray:{ctx.gcs_address}"

    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        ray = self.ray
        log.info("stopping %d Ray actors: %s", len(self._actors), reason)
        for a in self._actors.values():
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            a.alive = False
        self._calls.clear()
        self._pending.clear()
        self._delayed.clear()
        self._blobs.clear()
        self._blob_sizes.clear()
        self._blob_round.clear()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None

    # -- engine-facing ---------------------------------------------------------
    #: payloads kept beyond those a queued or in-flight task refers to
    keep_blobs = 2

    def publish_blob(self, blob_id: str, payload: bytes | SpooledBlob) -> None:
        """Put a payload into the object store once (as a uint8 array: zero-copy reads on each node)."""
        if blob_id not in self._blobs:
            if isinstance(payload, SpooledBlob):  # the object store needs one buffer
                payload = payload.tobytes()
            self._blobs[blob_id] = self.ray.put(np.frombuffer(payload, dtype=np.uint8))
            self._blob_sizes[blob_id] = len(payload)

    def _prune_blobs(self) -> None:
        """Release payloads that no queued or running task needs and the engine cannot reuse.

        Kept: payloads of queued or running tasks, of the newest round tasks were submitted for
        (the engine hands them out again without re-publishing), and the newest ``keep_blobs``.
        A payload is always published right before the submit of the tasks that refer to it.
        """
        needed = {t.blob_id for t, _ in self._pending} | {t.blob_id for c in self._calls.values() for t in c.tasks}
        names = list(self._blobs)
        for name in names[: max(0, len(names) - self.keep_blobs)]:
            if name in needed or self._blob_round.get(name) == self._latest_round:
                continue
            del self._blobs[name]
            self._blob_sizes.pop(name, None)
            self._blob_round.pop(name, None)

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        for t in tasks:
            self._blob_round[t.blob_id] = max(t.round, self._blob_round.get(t.blob_id, t.round))
            if self._latest_round is None or t.round > self._latest_round:
                self._latest_round = t.round
        self._pending.extend((t, 1) for t in tasks)
        self._prune_blobs()
        self._dispatch()

    def forget_tasks(self, task_ids: list[str]) -> None:
        """The engine gave up on these tasks: drop them from the queue; a running or held-back result is discarded."""
        drop = set(task_ids)
        self._pending = deque((t, n) for t, n in self._pending if t.task_id not in drop)
        for call in self._calls.values():
            if call.more:
                call.dropped |= {t.task_id for t in call.tasks if t.task_id in drop}
            elif call.task is not None and call.task.task_id in drop:
                call.cancelled = True
        if any(d[2].task_id in drop for d in self._delayed):
            self._delayed = [d for d in self._delayed if d[2].task_id not in drop]
            heapq.heapify(self._delayed)
        self._prune_blobs()

    def _dispatch(self) -> None:
        """Hand queued tasks to idle actors: one each, or with lockstep a fair share of a round's tasks."""
        idle = [a for a in self._actors.values() if a.alive and not a.busy and not a.probing]
        for n, a in enumerate(idle):
            if not self._pending:
                return
            batch: list[tuple[TrainTask, int, Any]] = []
            share = 1
            if self.lockstep_clients > 1:
                first_round = self._pending[0][0].round
                queued = sum(1 for t, _ in self._pending if t.round == first_round)
                share = min(self.lockstep_clients, -(-queued // (len(idle) - n)))
            while self._pending and len(batch) < share:
                if batch and self._pending[0][0].round != batch[0][0].round:
                    break
                task, attempt = self._pending.popleft()
                if attempt == 1 and self.sim.drops(task):  # drawn per (seed, round, client, attempt, dispatch), as in simulate
                    log.info("simulated dropout: task %s gets no reply", task.task_id)
                    continue
                blob = self._blobs.get(task.blob_id)
                if blob is None:
                    self._events.append(Rejection(task.task_id, a.worker_id, "unknown_blob", f"payload {task.blob_id} was dropped"))
                    continue
                batch.append((task, attempt, blob))
                if task.blob_id not in a.blobs_seen:  # counted once per actor and payload (the store ships it once per node)
                    a.blobs_seen = (a.blobs_seen & set(self._blobs)) | {task.blob_id}
                    a.bytes_down += self._blob_sizes.get(task.blob_id, 0)
                    self._bytes_down += self._blob_sizes.get(task.blob_id, 0)
            if not batch:
                continue
            a.busy = True
            if len(batch) == 1:
                task, attempt, blob = batch[0]
                self._calls[a.handle.train.remote(task, blob)] = _Call(a, task, attempt)
            else:  # payload refs as top-level arguments, so Ray resolves each (zero-copy) before the call
                tasks = [t for t, _, _ in batch]
                ref = a.handle.train_many.remote(tasks, *[b for _, _, b in batch])
                self._calls[ref] = _Call(a, tasks[0], max(n for _, n, _ in batch), more=tasks[1:])

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

    def _complete(self, ref: Any) -> None:
        ray = self.ray
        call = self._calls.pop(ref)
        a = call.actor
        a.last_seen = time.time()
        try:
            value = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._actor_failed(call, exc)
            return
        except ray.exceptions.RayError as exc:
            a.busy = a.probing = False
            for task in call.tasks:
                if call.wanted(task):
                    log.warning("task %s failed on %s: %s", task.task_id, a.worker_id, _short(exc))
                    self._events.append(Rejection(task.task_id, a.worker_id, "worker_error", _short(exc)))
            return
        if call.task is None:  # probe answered: the (restarted) actor is back
            a.probing = False
            a.alive = True
            a.probe_failures = 0
            a.info = value
            log.info("Ray actor %s is back (pid %s)", a.worker_id, value.get("pid"))
            return
        a.busy = False
        tasks = call.tasks
        a.tasks_done += len(tasks)
        if call.more:
            if not isinstance(value, (list, tuple)) or len(value) != len(tasks):
                for task in tasks:
                    self._events.append(Rejection(task.task_id, a.worker_id, "malformed", "train_many returned the wrong number of results"))
                return
            results = list(zip(tasks, value, strict=True))
        else:
            results = [(tasks[0], value)]
        for task, result in results:
            if not call.wanted(task):
                continue
            delay = self.sim.delay_s(task.client_id, _compute_s(result))
            if delay > 0:  # a simulated slow client: the actor is free, the reply comes later
                heapq.heappush(self._delayed, (time.time() + delay, next(self._seq), task, a, result, delay))
                continue
            self._events.append(self._decode(task, a, result))

    def _decode(self, task: TrainTask, a: _Actor, value: Any, extra: dict[str, float] | None = None) -> Event:
        try:
            update, num_examples, metrics = value
            buf = memoryview(np.ascontiguousarray(update, dtype=np.uint8)).cast("B")
            if len(buf) > self.max_update_bytes:
                raise RejectedUpdate("too_large", f"{len(buf)} bytes exceeds the limit of {self.max_update_bytes}")
            decoder = self.decoder_factory(task.task_id, task.client_id)
            decoder.feed(buf)
            state = decoder.finish()
        except ProtocolError as exc:
            return Rejection(task.task_id, a.worker_id, "malformed", str(exc))
        except RejectedUpdate as exc:
            log.warning("rejected update worker=%s task=%s: %s", a.worker_id, task.task_id, exc)
            return Rejection(task.task_id, a.worker_id, exc.reason, str(exc))
        except (TypeError, ValueError) as exc:
            return Rejection(task.task_id, a.worker_id, "malformed", f"unexpected result from actor: {exc}")
        a.bytes_up += len(buf)
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

    def _actor_failed(self, call: _Call, exc: Exception) -> None:
        """A call failed because its actor died: re-queue the task, then probe until the actor is back."""
        a = call.actor
        a.busy = False
        a.probing = False
        for task in reversed(call.tasks):  # back to the front of the queue, in their order
            log.warning("Ray actor %s failed during task %s (attempt %d): %s", a.worker_id, task.task_id, call.attempt, _short(exc))
            if call.wanted(task):
                if call.attempt < self.spec.max_attempts:
                    self._pending.appendleft((task, call.attempt + 1))
                else:
                    self._events.append(Rejection(task.task_id, a.worker_id, "worker_died", f"{call.attempt} attempts failed: {_short(exc)}"))
        if call.task is not None:
            a.restarts += 1
        else:
            a.probe_failures += 1
        if isinstance(exc, self.ray.exceptions.ActorDiedError):
            a.deaths += 1
            if 0 <= self.spec.max_restarts < a.deaths or a.probe_failures > 3:
                log.warning("Ray actor %s is dead (out of restarts): %s", a.worker_id, _short(exc))
                a.alive = False
                return
        # restarting or briefly unreachable: the probe answers once Ray has it back, fails at once if it is gone
        self._probe(a)

    def _probe(self, a: _Actor) -> None:
        """Ask a (restarting) actor for ``ready``; it takes no task until that answers."""
        a.probing = True
        self._calls[a.handle.ready.remote()] = _Call(a, None)

    def cancel_pending(self) -> list[str]:
        """Drop queued tasks; tasks already running finish and are delivered (the engine decides: late, fold, ...)."""
        ids = [t.task_id for t, _ in self._pending]
        self._pending.clear()
        return ids

    def workers(self) -> dict[str, dict[str, Any]]:
        return {
            a.worker_id: {
                "own_data": False,
                "client_ids": [],
                "alive": a.alive,
                "left": False,
                "busy": a.busy,
                "restarting": a.probing,
                "restarts": a.restarts,
                "tasks_done": a.tasks_done,
                "last_seen": a.last_seen,
                "bytes_up": a.bytes_up,
                "bytes_down": a.bytes_down,
                "pid": a.info.get("pid"),
                "node_ip": a.info.get("node_ip"),
            }
            for a in self._actors.values()
        }

    def bytes_moved(self) -> tuple[int, int]:
        return self._bytes_up, self._bytes_down

    # -- for tests and tools ---------------------------------------------------
    def actor_handles(self) -> dict[str, Any]:
        """worker id -> Ray actor handle."""
        return {k: a.handle for k, a in self._actors.items()}

    def in_flight(self) -> dict[str, str]:
        """task id -> worker id of the tasks currently running."""
        return {t.task_id: c.actor.worker_id for c in self._calls.values() for t in c.tasks}


def _compute_s(value: Any) -> float:
    """The ``compute_s`` metric of an actor's result (0 when it has none)."""
    try:
        return float(value[2].get("compute_s", 0.0))
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return 0.0


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
