"""The split federation (cloud side): rounds over a fixed set of edges, driven by the round core.

Every edge is one client; each round (numbered from 1, as in ``dpeft simulate``) trains the
seeded sample of ``clients_per_round`` edges the round engine would draw; after
``train.local_steps`` steps their adapter deltas are aggregated by the configured dpeft
strategy and every edge continues from ``strategy.client_state(new_global, client_id)``.
The session protocol around it is in :mod:`dpeft.split.service`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig
from dpeft.errors import ProtocolError
from dpeft.rounds.recorder import ROUND0_FIELDS, ResumePoint, RoundRecorder
from dpeft.rounds.sampling import sample_clients
from dpeft.rounds.tally import RoundTally, finish_step, strategy_metrics
from dpeft.split.config import SplitConfig
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.aggregator import Aggregator

log = logging.getLogger("dpeft.split")


class Federation:
    """Rounds over a fixed set of edges: a seeded sample per round, a streaming aggregate, a dpeft strategy.

    Rounds are numbered from 1 like ``dpeft simulate``'s (round 0 is the untrained global's
    metrics line). Round r trains the edges ``sample_clients(seed, r, range(split.edges),
    clients_per_round)`` (the round engine's sampler); the others sit it out and receive the new
    global when it closes. A driver over the round core (:mod:`dpeft.rounds`): with ``run_dir``
    its :class:`~dpeft.rounds.recorder.RoundRecorder` writes ``metrics.jsonl`` and a checkpoint
    per round (with the edges' client ids and the round's row, which waits for the evaluating
    edge), and resumes from the newest readable checkpoint there unless ``resume`` is false.
    """

    def __init__(
        self, run: RunConfig, split: SplitConfig, initial: AdapterState, run_dir: Path | None = None, export=None, resume: bool = True
    ) -> None:
        self.run = run
        self.split = split
        self.edges = split.edges
        self.rounds = run.rounds
        self.strategy = make_strategy(run.strategy)
        self.global_state = initial
        self.schema = initial.schema()
        self.round = 0  # rounds closed so far; the next one is round + 1
        self._agg: Aggregator | None = None
        self._tally: RoundTally | None = None
        self._cond = threading.Condition()
        self._registered: dict[str, int] = {}  # edge id -> client id (kept in checkpoints)
        self._connected: set[int] = set()
        self._round_t0 = time.time()
        self.run_dir = run_dir
        self.recorder = RoundRecorder(run_dir, run.rounds, run.seed, export=export, elapsed_digits=3, cfg=run)
        self.metrics = self.recorder.metrics
        self.failed: str | None = None
        found = self.recorder.resume(self.schema, write_lost_row=False) if run_dir is not None and resume else None
        if found is not None:
            self._resume(found)
        else:  # a fresh run: older checkpoints would outrank (and be kept over) the new ones
            self.recorder.start_over()
            self._hold(0, {**ROUND0_FIELDS, "wall_s": 0.0})

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    @property
    def resumed_from(self) -> int | None:
        """The checkpointed round this federation resumed from (None: it started at round 0)."""
        return self.recorder.resumed_from

    # -- resume -----------------------------------------------------------------
    def _resume(self, found: ResumePoint) -> None:
        self.global_state = found.global_state
        self.strategy.load_state_dict(found.strategy_state)
        self.round = found.round
        self._registered = {str(k): int(v) for k, v in found.info.get("edges", {}).items() if 0 <= int(v) < self.edges}
        if found.lost_row is not None:  # its line was lost with the process: evaluate (again) and write it
            self._hold(found.round, found.lost_row)

    # -- edges ------------------------------------------------------------------
    def reserve(self, edge_ids: list[str]) -> None:
        """Give these edge ids the lowest free client ids, in order (simulate: edge-i is client i)."""
        with self._cond:
            for edge_id in edge_ids:
                if edge_id not in self._registered:
                    free = sorted(set(range(self.edges)) - set(self._registered.values()))
                    if free:
                        self._registered[edge_id] = free[0]

    def register(self, edge_id: str) -> int:
        """This edge's client id: its own from before (a reconnect or a resumed run), else a free one."""
        with self._cond:
            cid = self._registered.get(edge_id)
            if cid is None:
                free = sorted(set(range(self.edges)) - set(self._registered.values()))
                if not free:  # a slot whose edge id is not connected now (e.g. an edge restarted with a new id)
                    free = sorted(set(range(self.edges)) - self._connected)
                if not free:
                    raise ProtocolError(f"all {self.edges} edge slots are taken (split.edges)")
                cid = free[0]
                self._registered = {k: v for k, v in self._registered.items() if v != cid}
                self._registered[edge_id] = cid
            self._connected.add(cid)
            return cid

    def unregister(self, client_id: int) -> None:
        with self._cond:
            self._connected.discard(client_id)

    def sampled(self, round_num: int) -> list[int]:
        """The edges (client ids) that train in round ``round_num``: the round engine's seeded sample."""
        return sample_clients(self.run.seed, round_num, list(range(self.edges)), self.run.clients_per_round)

    def _next_for(self, client_id: int) -> tuple[AdapterState, int, bool]:
        nxt = self.round + 1
        trains = nxt <= self.rounds and client_id in self.sampled(nxt)
        return self.strategy.client_state(self.global_state, client_id), nxt, trains

    def welcome(self, client_id: int) -> tuple[AdapterState, int, bool, bool]:
        """(state to start from, next round, trains in it, evaluate the state first)."""
        with self._cond:
            state, nxt, trains = self._next_for(client_id)
            return state, nxt, trains, self.recorder.is_held(self.round)

    # -- rounds -----------------------------------------------------------------
    def _wait(self, predicate, what: str) -> None:
        timeout = self.run.sync.round_timeout_s
        if not self._cond.wait_for(lambda: predicate() or self.failed is not None, timeout=timeout):
            self.failed = f"{what} not complete after {timeout:.0f} s (sync.round_timeout_s)"
            self._cond.notify_all()
        if self.failed:
            raise ProtocolError(self.failed)

    def submit(self, client_id: int, round_num: int, delta: AdapterState, num_examples: int, metrics: dict[str, float]) -> tuple[AdapterState, int, bool]:
        """Fold one edge's delta; block until the round closes; return (its next state, next round, trains in it)."""
        with self._cond:
            if round_num != self.round + 1:
                raise ProtocolError(f"update for round {round_num}, but the federation is at round {self.round + 1}")
            sampled = self.sampled(round_num)
            if client_id not in sampled:
                raise ProtocolError(f"edge {client_id} sent an update for round {round_num}, which did not sample it")
            if self._agg is None or self._tally is None:
                self._agg = self.strategy.begin_round(self.global_state)
                self._tally = RoundTally(sums=("bytes_up", "bytes_down", "steps", "edge_flops"))
                self._tally.t0 = self._round_t0
            if metrics.get("train_loss") != metrics.get("train_loss"):  # NaN: left out of the round's mean loss
                metrics = {k: v for k, v in metrics.items() if k != "train_loss"}
            update = ClientUpdate(client_id=client_id, delta=delta, num_examples=max(1, num_examples), metrics=metrics)
            self._agg.add(update)
            self._tally.add(update, num_examples)
            if self._agg.count == len(sampled):
                # lines stay in order: the previous round's evaluation comes first
                self._wait(lambda: not self.recorder.is_held(self.round), f"the evaluation of round {self.round}")
                self._close_round(round_num, sampled)
                self._cond.notify_all()
            else:
                self._wait(lambda: self.round >= round_num, f"round {round_num}")
            return self._next_for(client_id)

    def skip(self, client_id: int, round_num: int) -> tuple[AdapterState, int, bool]:
        """An edge not sampled for ``round_num``: block until that round closes; then as :meth:`submit`."""
        with self._cond:
            if round_num > self.round + 1 or (round_num == self.round + 1 and client_id in self.sampled(round_num)):
                raise ProtocolError(f"edge {client_id} cannot sit out round {round_num}")
            self._wait(lambda: self.round >= round_num, f"round {round_num}")
            return self._next_for(client_id)

    def _close_round(self, round_num: int, sampled: list[int]) -> None:
        tally, aggregator = self._tally, self._agg
        assert tally is not None and aggregator is not None
        self.global_state = finish_step(self.strategy, self.global_state, aggregator, round_num)
        self._agg = self._tally = None
        sums = tally.sums
        row = tally.row(round_num, aggregator.count, sampled, int(sums["bytes_up"]), int(sums["bytes_down"]), reasons=False)
        row.update({"split_steps": int(sums["steps"]), "edge_flops": sums["edge_flops"], "wall_s": round(time.time() - tally.t0, 3)})
        row.update(strategy_metrics(self.strategy, aggregator.count))
        self._round_t0 = time.time()
        self.round = round_num
        self.recorder.save(round_num, self.global_state, self.strategy.state_dict(), {"edges": dict(self._registered)}, row=row)
        self._hold(round_num, row)

    def _hold(self, round_num: int, row: dict[str, Any]) -> None:
        """Write the line now, or keep it for the evaluating edge's result."""
        self.recorder.hold(round_num, row)
        if not self.split.eval_examples:
            self._wrote(self.recorder.release(round_num))

    def report_eval(self, round_num: int, loss: float | None, accuracy: float | None) -> None:
        """The evaluating edge's result for round ``round_num`` (None: it had no held-out data)."""
        with self._cond:
            evaluation = {"eval_loss": loss, "eval_accuracy": accuracy} if loss is not None else None
            self._wrote(self.recorder.release(round_num, evaluation))
            self._cond.notify_all()

    def flush(self) -> None:
        """Write any line still waiting for an evaluation (end of the run)."""
        with self._cond:
            self._wrote(self.recorder.flush())

    def _wrote(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["round"] == 0:  # round 1's clock starts once the edges are up and the start is evaluated
                self._round_t0 = time.time()
            log.info("round %s: %s", row["round"], row)
