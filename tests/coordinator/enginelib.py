"""A model-free harness for the round engine: a fake global model and an in-memory transport.

:class:`FakeTransport` plays every worker itself: when the engine submits a task, a
``behaviour(task, received_state)`` callback decides whether (and after how long) the client
replies, and with what. Replies go through the engine's own validating decoder
(``decoder_for``), exactly as gRPC uploads do, so schema checks are exercised.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpeft.codec import decode_state, encode_state
from dpeft.config import RunConfig
from dpeft.errors import ProtocolError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.hyperparams import is_full_factor, sent_names
from dpeft.transport.base import CoordinatorTransport, Event, Rejection, TaskResult, TrainTask
from dpeft.validate import load_config
from dpeft_coordinator.engine import RoundEngine

OUT, IN, R = 6, 5, 4


def lora_state(rank: int = R, seed: int = 0) -> AdapterState:
    """Two LoRA modules plus a plain head, like a tiny seq_cls adapter."""
    g = torch.Generator().manual_seed(seed)
    t: OrderedDict[str, torch.Tensor] = OrderedDict()
    for m in ("q", "v"):
        t[f"layer.{m}.lora_A.weight"] = torch.randn(rank, IN, generator=g) * 0.3
        t[f"layer.{m}.lora_B.weight"] = torch.zeros(OUT, rank)
    t["classifier.weight"] = torch.zeros(2, IN)
    return AdapterState(t)


class FakeGlobalModel:
    """initial_state / evaluate / export without a model: accuracy is a function of the head."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state
        self.evaluated: list[AdapterState] = []

    def initial_state(self) -> AdapterState:
        return self.state.clone()

    def evaluate(self, state: AdapterState) -> dict[str, float]:
        self.evaluated.append(state)
        head = float(state["classifier.weight"].sum())
        return {"eval_loss": abs(1.0 - head), "eval_accuracy": 0.5 + min(0.5, abs(head) / 10)}

    def export(self, state: AdapterState, directory: str | Path) -> Path:
        return Path(directory)


@dataclass
class Reply:
    """What a fake client sends: after ``delay_s``, the update built by ``make`` (default: +1 on every sent tensor)."""

    delay_s: float = 0.0
    make: Callable[[TrainTask, AdapterState], AdapterState] | None = None
    num_examples: int = 10


Behaviour = Callable[[TrainTask, AdapterState], "Reply | None"]


def default_update(task: TrainTask, received: AdapterState, value: float = 1.0) -> AdapterState:
    """A well-formed update: full factors as received, deltas of ``value`` elsewhere, omitted names left out."""
    hp = task.hyperparams
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in sent_names(received.tensors, hp):
        out[k] = received[k].clone() if is_full_factor(k, hp) else torch.full_like(received[k], value)
    return AdapterState(out)


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    event: Any = field(compare=False)


class FakeTransport(CoordinatorTransport):
    """In-memory transport; replies are scheduled by ``behaviour``. Records what every client received."""

    def __init__(self, behaviour: Behaviour, engine: RoundEngine | None = None, clients: int = 0) -> None:
        self.behaviour = behaviour
        self.engine = engine
        self.clients = clients
        self.blobs: dict[str, bytes] = {}
        self.received: list[tuple[int, int, AdapterState]] = []  # (round, client, state)
        self.submitted: list[TrainTask] = []
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.cancelled = 0
        self.forgotten: list[str] = []

    def start(self) -> str:
        return "fake"

    def publish_blob(self, blob_id: str, payload: bytes) -> None:
        self.blobs[blob_id] = payload

    def submit(self, tasks: list[TrainTask], pinned: dict[int, str]) -> None:
        assert self.engine is not None
        now = time.time()
        for task in tasks:
            self.submitted.append(task)
            received = decode_state(self.blobs[task.blob_id])
            self.received.append((task.round, task.client_id, received))
            reply = self.behaviour(task, received)
            if reply is None:
                continue  # dropped: never answers
            update = (reply.make or default_update)(task, received)
            with self._lock:
                heapq.heappush(self._heap, _Due(now + reply.delay_s, next(self._seq), (task, update, reply.num_examples)))

    def _deliver(self, task: TrainTask, update: AdapterState, n: int) -> Event:
        payload = encode_state(update)
        try:
            dec = self.engine.decoder_for(task.task_id, task.client_id)
            dec.feed(payload)
            state = dec.finish()
        except ProtocolError as exc:
            return Rejection(task.task_id, "fake", "malformed", str(exc))
        except RejectedUpdate as exc:
            return Rejection(task.task_id, "fake", exc.reason, str(exc))
        return TaskResult(task.task_id, task.client_id, "fake", state, n, {"train_loss": 0.5}, len(payload))

    def next_event(self, timeout: float) -> Event | None:
        end = time.time() + timeout
        while True:
            with self._lock:
                if self._heap and self._heap[0].at <= time.time():
                    due = heapq.heappop(self._heap)
                    return self._deliver(*due.event)
                wait = min(end, self._heap[0].at if self._heap else end) - time.time()
            if wait <= 0 and time.time() >= end:
                return None
            time.sleep(max(0.0, min(wait, 0.02)))

    def cancel_pending(self) -> list[str]:
        self.cancelled += 1
        return []

    def forget_tasks(self, task_ids: list[str]) -> None:
        self.forgotten.extend(task_ids)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {"w0": {"alive": True, "left": False, "own_data": False, "client_ids": []}}

    def bytes_moved(self) -> tuple[int, int]:
        return 0, 0

    def shutdown(self, reason: str, grace_s: float = 5.0) -> None:
        pass


def make_engine(
    tmp_path: Path, overrides: list[str], behaviour: Behaviour, state: AdapterState | None = None, resume: bool = False
) -> tuple[RoundEngine, FakeTransport]:
    """A RoundEngine on a fake model and transport (train.eval_every=1, tiny timeouts by default)."""
    cfg: RunConfig = load_config(None, [f"run_dir={tmp_path / 'run'}", "sync.round_timeout_s=20", *overrides])
    gm = FakeGlobalModel(state or lora_state())
    engine = RoundEngine(cfg, gm, Path(cfg.run_dir), resume=resume)  # type: ignore[arg-type]
    transport = FakeTransport(behaviour, engine, cfg.clients)
    return engine, transport
