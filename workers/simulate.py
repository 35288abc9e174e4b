"""Simulated client heterogeneity: slow clients, dropped tasks and Byzantine clients.

None of this is in the real worker (`dpeft worker` on an edge machine). `dpeft simulate` wraps
its workers with :func:`simulated_worker`; Ray applies :class:`Heterogeneity` around its actors
(the transport drops and delays tasks, :meth:`Heterogeneity.install` corrupts updates in the
actor's runtime).

``simulate.speed_factors`` (cycled over client ids) makes client ``c`` with factor ``f``
answer ``(f - 1) x compute time`` after it finished training; the worker process trains other
clients' tasks meanwhile, as separate devices would. ``simulate.dropout`` is the probability
that a task is dropped without a reply, drawn from (seed, round, client, attempt, dispatch),
so a run is reproducible and a re-assigned attempt is an independent draw.
``simulate.byzantine_clients`` send their update times ``simulate.byzantine_scale`` (with
``byzantine_random_sign``, times an independent random sign per element, seeded per (seed,
round, client)); the corruption happens before the update is encoded, so error-feedback
codecs see what the client sent.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from dpeft.config import RunConfig
from dpeft.state import AdapterState
from dpeft.train import task_seed
from dpeft.transport.base import TrainTask, WorkerConnection, WorkerRegistration

log = logging.getLogger("dpeft.worker")


class Heterogeneity:
    """Per-client speed, dropout and Byzantine decisions of one run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.seed = cfg.seed
        self.speed_factors = list(cfg.simulate.speed_factors)
        self.dropout = cfg.simulate.dropout
        self.byzantine_clients = set(cfg.simulate.byzantine_clients)
        self.byzantine_scale = cfg.simulate.byzantine_scale
        self.byzantine_random_sign = cfg.simulate.byzantine_random_sign

    def speed_factor(self, client_id: int) -> float:
        """The slowdown of ``client_id`` (1 = full speed)."""
        if not self.speed_factors:
            return 1.0
        return float(self.speed_factors[client_id % len(self.speed_factors)])

    def delay_s(self, client_id: int, compute_s: float) -> float:
        """Seconds to hold a finished update back."""
        return max(0.0, (self.speed_factor(client_id) - 1.0) * compute_s)

    def drops(self, task: TrainTask) -> bool:
        """Whether this task is dropped without a reply."""
        if self.dropout <= 0:
            return False
        hp = task.hyperparams
        key = [self.seed, task.round, task.client_id, int(hp.get("attempt", 0)), int(hp.get("task_seq", 0)), 0xD0]
        if task.kind:  # an evaluation task is drawn apart from the client's training task of that round
            key.append(0xE7A1)
        return bool(np.random.default_rng(key).random() < self.dropout)

    def corrupt(self, task: TrainTask, delta: AdapterState) -> AdapterState:
        """The update a Byzantine client sends instead of ``delta`` (``delta`` itself for honest clients)."""
        if task.client_id not in self.byzantine_clients:
            return delta
        gen = torch.Generator().manual_seed(task_seed(self.seed + 7, task.round, task.client_id))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, v in delta.items():
            t = v * self.byzantine_scale
            if self.byzantine_random_sign:
                t = t * (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1).to(v.dtype)
            out[k] = t
        return AdapterState(out, dict(delta.meta))

    def install(self, runtime: Any) -> Any:
        """``runtime`` (a WorkerRuntime) with Byzantine clients' updates corrupted; returns it."""
        if self.byzantine_clients:
            runtime.update_hook = self.corrupt
        return runtime


class SimulatedConnection(WorkerConnection):
    """A worker's connection with dropped and delayed replies: tasks drawn to drop never reach
    the worker, and a slow client's update is pushed ``delay_s`` after training (meanwhile the
    worker trains other tasks). Everything else goes to the real connection (attributes too,
    e.g. ``stop_requested``)."""

    def __init__(self, conn: WorkerConnection, heterogeneity: Heterogeneity) -> None:
        self._conn = conn
        self.sim = heterogeneity
        self._leaving = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        return self._conn.join(worker_id, own_examples)

    def poll(self) -> TrainTask | float | str:
        item = self.poll_many(1)
        if isinstance(item, list):
            return item[0] if item else 0.0
        return item

    def fetch(self, task: TrainTask) -> bytes | bytearray | mmap.mmap:
        return self._conn.fetch(task)

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        item = self._conn.poll_many(max_tasks)
        if not isinstance(item, list):
            return item
        kept = []
        for task in item:
            if self.sim.drops(task):
                log.info("simulated dropout: task %s gets no reply", task.task_id)
            else:
                kept.append(task)
        return kept if kept or not item else 0.0  # all dropped: poll again at once

    def push(self, task: TrainTask, update: bytes, n: int, metrics: dict[str, float]) -> tuple[bool, str]:
        delay = self.sim.delay_s(task.client_id, metrics.get("compute_s", 0.0))
        if delay <= 0:
            return self._conn.push(task, update, n, metrics)
        metrics["simulated_delay_s"] = delay
        threading.Thread(target=self._push_later, args=(task, update, n, metrics, delay), daemon=True).start()
        return True, ""

    def _push_later(self, task: TrainTask, update: bytes, n: int, metrics: dict[str, float], delay: float) -> None:
        """A simulated slow client: reply after ``delay`` seconds (unless the worker leaves first)."""
        if self._leaving.wait(delay):
            return
        try:
            ok, reason = self._conn.push(task, update, n, metrics)
            if not ok:
                log.warning("update for task %s rejected: %s", task.task_id, reason)
        except Exception as exc:  # noqa: BLE001 - the worker may be leaving; a lost late reply is what a slow client risks
            log.info("delayed update for task %s not delivered: %s", task.task_id, exc)

    def leave(self) -> None:
        self._leaving.set()  # delayed (simulated slow) replies are abandoned
        self._conn.leave()


def simulated_worker(cfg: RunConfig, conn: WorkerConnection, runtime: Any) -> WorkerConnection:
    """The ``wrap`` of :func:`dpeft_workers.loop.run_worker` for `dpeft simulate` workers:
    installs Byzantine clients in ``runtime``, returns the connection with drops and delays."""
    sim = Heterogeneity(cfg)
    sim.install(runtime)
    return SimulatedConnection(conn, sim)
