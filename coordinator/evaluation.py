"""The coordinator's side of federated evaluation (``eval.federated``; design in :mod:`dpeft.rounds.fedeval`).

After an evaluated round's aggregation the engine hands the new global to
:meth:`FederatedEvaluator.run`: it samples ``eval.clients`` clients among those a worker that runs
evaluation tasks can serve (seeded, a stream of its own), publishes the global (one payload per
``strategy.client_key``, as for training), submits one evaluation task per client and collects
the replies until every sampled client answered, ``sync.task_timeout_s`` (when set) or
``sync.round_timeout_s`` passed, or the run stops. Results are checked (at least one example,
finite ``eval_loss`` / ``eval_accuracy``; the upload decoder admits no tensor) and tallied into the
round's ``fed_eval_*`` fields; a refused, lost or late reply is counted in ``fed_eval_failed`` and
never fails the round. Events of training tasks that arrive meanwhile (late or asynchronous
updates) are kept for the round loop (:meth:`FederatedEvaluator.held`), and any later reply to an
evaluation task is dropped there instead of counting as a training rejection.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from dpeft.codec.tensors import Limits, StateDecoder
from dpeft.errors import RejectedUpdate
from dpeft.rounds.fedeval import EVALUATE, FedEvalTally, eval_sample_size, eval_wait_s, sample_eval_clients
from dpeft.state import AdapterState
from dpeft.transport.base import CoordinatorTransport, Event, Rejection, TaskResult, TrainTask

if TYPE_CHECKING:
    from dpeft_coordinator.engine import RoundEngine

log = logging.getLogger("dpeft.coordinator")

#: an evaluation reply carries no tensor: its payload is an empty adapter container
_EMPTY_SCHEMA = AdapterState().schema()


class FederatedEvaluator:
    """Evaluation tasks of one run: sampling, payloads, collection, the ``fed_eval_*`` row fields."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self._open: dict[str, int] = {}  # evaluation task id -> client id, while collecting
        self._closed: set[str] = set()  # evaluation tasks no longer wanted (a reply is dropped)
        self.held: deque[Event] = deque()  # training events that arrived during an evaluation
        self._warned = False

    def owns(self, task_id: str) -> bool:
        """Whether ``task_id`` is (or was) one of this run's evaluation tasks."""
        return task_id in self._open or task_id in self._closed

    def decoder_for(self, task_id: str, client_id: int) -> StateDecoder | None:
        """The decoder of an evaluation reply (no tensor admitted); None for other tasks.
        A reply to an evaluation task no longer collected is refused as ``late``."""
        if task_id in self._closed:
            raise RejectedUpdate("late", f"evaluation task {task_id!r} is closed")
        expected = self._open.get(task_id)
        if expected is None:
            return None
        if expected != client_id:
            raise RejectedUpdate("wrong_client", f"task {task_id!r} belongs to client {expected}")
        return StateDecoder(_EMPTY_SCHEMA, Limits(max_total_bytes=1 << 16))

    def eligible(self, transport: CoordinatorTransport) -> tuple[list[int], dict[int, str]]:
        """(clients an evaluating worker can serve, client id -> the worker holding its data)."""
        workers = {k: v for k, v in transport.workers().items() if v["alive"] and not v["left"]}
        pinned = {c: wid for wid, w in workers.items() for c in w["client_ids"]}
        able = {wid for wid, w in workers.items() if EVALUATE in w.get("task_kinds", ())}
        if any(not workers[w]["own_data"] for w in able):
            clients = [c for c in range(self.cfg.clients) if c not in pinned or pinned[c] in able]
        else:
            clients = sorted(c for c, wid in pinned.items() if wid in able)
        return clients, pinned

    def run(self, transport: CoordinatorTransport, round_num: int, state: AdapterState) -> dict[str, Any]:
        """Evaluate ``state`` (the global after round ``round_num``) on sampled clients; the row's ``fed_eval_*`` fields."""
        eligible, pinned = self.eligible(transport)
        sampled = sample_eval_clients(self.cfg.seed, round_num, eligible, eval_sample_size(self.cfg))
        tally = FedEvalTally(sampled)
        if not sampled:
            if not self._warned:
                log.warning(
                    "eval.federated: no connected worker runs evaluation tasks; round %d has no federated evaluation", round_num
                )
                self._warned = True
            return tally.row()
        up0, down0 = transport.bytes_moved()
        tasks = self._tasks(transport, round_num, state, sampled)
        transport.submit(tasks, pinned)
        deadline = time.time() + eval_wait_s(self.cfg)
        engine = self.engine
        while tally.pending and not engine.stop_event.is_set():
            left = deadline - time.time()
            if left <= 0:
                break
            engine.recorder.progress(f"round {round_num}: federated evaluation {len(tally.clients)}/{len(sampled)} clients")
            event = transport.next_event(timeout=min(left, 0.5))
            if event is None:
                continue
            if event.task_id not in self._open:
                if not self.owns(event.task_id):
                    self.held.append(event)  # a training task's event: the round loop takes it
                continue
            client = self._open.pop(event.task_id)
            self._closed.add(event.task_id)
            self._tally(event, client, tally)
        missing = list(self._open)
        for tid in missing:
            tally.fail(self._open[tid], "stopped" if engine.stop_event.is_set() else "timeout")
        if missing:
            log.warning(
                "round %d: %d federated evaluation(s) without a reply after %.0fs", round_num, len(missing), eval_wait_s(self.cfg)
            )
            transport.forget_tasks(missing)
        self._closed.update(self._open)
        self._open.clear()
        up1, down1 = transport.bytes_moved()
        tally.bytes_up, tally.bytes_down = up1 - up0, down1 - down0
        return tally.row()

    def _tally(self, event: Event, client: int, tally: FedEvalTally) -> None:
        if isinstance(event, Rejection):
            log.warning("federated evaluation of client %d refused: %s (%s)", client, event.reason, event.detail)
            tally.fail(client, event.reason)
            return
        assert isinstance(event, TaskResult)
        m = event.metrics
        values = [m.get("eval_loss"), m.get("eval_accuracy")]
        if event.num_examples <= 0 or len(event.delta) or not all(isinstance(v, float) and math.isfinite(v) for v in values):
            log.warning("federated evaluation of client %d refused: malformed result", client)
            tally.fail(client, "malformed")
            return
        tally.add(client, m, event.num_examples)

    def _tasks(self, transport: CoordinatorTransport, round_num: int, state: AdapterState, clients: list[int]) -> list[TrainTask]:
        """One evaluation task per client, its payload published once per ``strategy.client_key``."""
        engine = self.engine
        strategy = engine.strategy
        hp = strategy.configure_train(round_num, state)
        hp = {"personal": hp["personal"]} if hp.get("personal") else {}  # evaluate with the client's own personal tensors
        variants: dict[Any, tuple[str, int, bytes, int]] = {}
        tasks = []
        for c in clients:
            key = strategy.client_key(c)
            if key not in variants:
                client_state = strategy.client_state(state, c)
                variants[key] = engine.publish_state(
                    transport, AdapterState(client_state.tensors, {**state.meta, "round": round_num}), f"e{round_num}"
                )
            blob_id, size, digest, crc = variants[key]
            tag = hashlib.sha256(f"{self.cfg.seed}/{round_num}e/{c}/{engine.run_dir}".encode()).hexdigest()[:8]
            task = TrainTask(f"r{round_num}e-c{c}-{tag}", round_num, c, blob_id, size, digest, hp, blob_crc32=crc, kind=EVALUATE)
            self._open[task.task_id] = c
            self._closed.discard(task.task_id)  # a resumed run evaluates a round again
            tasks.append(task)
        return tasks
