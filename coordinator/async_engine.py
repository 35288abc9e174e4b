"""The `async` sync policy's loop: FedBuff-style buffered asynchronous aggregation.

Up to ``concurrency`` tasks are in flight; each starts from the global current when it was
dispatched, and a freed slot is refilled at once with a client that is not busy (seeded
choice). Accepted updates fold into the strategy's aggregator with their example weight
scaled by ``s(tau)`` (``tau`` = aggregation steps since dispatch; beyond ``max_staleness``
they are rejected as ``too_stale``). Every ``buffer_size`` accepted updates the strategy
finishes a step: new global, evaluation (every ``train.eval_every`` steps), checkpoint, and
one ``metrics.jsonl`` line with staleness statistics. ``rounds`` counts steps.

It drives a :class:`~dpeft_coordinator.engine.RoundEngine` through its public methods only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dpeft.rounds.sampling import sample_free
from dpeft.rounds.tally import RoundTally, client_ranks
from dpeft.transport.base import CoordinatorTransport
from dpeft_coordinator.errors import RoundTimeout

if TYPE_CHECKING:
    from dpeft_coordinator.engine import RoundEngine



class _Step(RoundTally):
    """The aggregation step being filled: the tally plus the transfer and dispatch counters."""

    def __init__(self, transport: CoordinatorTransport) -> None:
        super().__init__()
        self.up0, self.down0 = transport.bytes_moved()
        self.lost = 0
        self.dispatched = 0


def run_async(engine: RoundEngine, transport: CoordinatorTransport) -> None:
    """Run aggregation steps until ``engine.round == cfg.rounds`` or ``engine.stop_event`` is set."""
    cfg = engine.cfg
    policy = engine.policy
    buffer_size = policy.buffer_size()  # type: ignore[attr-defined]
    concurrency = policy.concurrency(cfg.clients)  # type: ignore[attr-defined]
    _, pinned = engine.wait_for_workers(transport)
    inflight: dict[str, int] = {}  # task id -> client id
    seq = 0
    hp_version = -1
    hp: dict[str, Any] = {}
    step = _Step(transport)
    aggregator = engine.strategy.begin_round(engine.global_state)
    min_updates = max(buffer_size, engine.strategy.min_updates())
    while engine.round < cfg.rounds and not engine.stop_event.is_set():
        if hp_version != engine.round:
            hp = engine.strategy.configure_train(engine.round + 1, engine.global_state)
            hp_version = engine.round
        eligible, pinned = engine.eligible(transport)
        busy = set(inflight.values())
        free = [c for c in eligible if c not in busy]
        want = min(concurrency - len(inflight), len(free))
        if want > 0:
            pick = sample_free(cfg.seed, engine.round, seq, free, want)
            tasks, _ = engine.make_tasks(transport, engine.round + 1, pick, {**hp, "task_seq": seq}, tag=f"a{seq}")
            seq += 1
            for t in tasks:
                inflight[t.task_id] = t.client_id
            transport.submit(tasks, pinned)
            step.dispatched += len(tasks)
        _, lost = engine.expire(transport, list(inflight), pinned)
        if lost:
            step.lost += lost
            for tid in [t for t in inflight if not engine.ledger.is_open(t)]:
                inflight.pop(tid)
        if time.time() - step.t0 > cfg.sync.round_timeout_s:
            transport.cancel_pending()
            raise RoundTimeout(
                f"async step {engine.round + 1}: {aggregator.count}/{buffer_size} updates after {cfg.sync.round_timeout_s:.0f}s "
                "(raise sync.round_timeout_s, set sync.task_timeout_s, or check the workers)"
            )
        event = engine.next_event(transport, timeout=0.2)
        if event is None:
            continue
        inflight.pop(event.task_id, None)
        if engine.fold(event, aggregator, step) is None:
            engine.ledger.drop(event.task_id)  # its slot is free again
            continue
        engine.recorder.progress(f"async step {engine.round + 1}/{cfg.rounds}: {aggregator.count}/{buffer_size} updates, {len(inflight)} in flight")
        if aggregator.count >= min_updates:
            _finish_step(engine, transport, aggregator, step, len(inflight))
            step = _Step(transport)
            aggregator = engine.strategy.begin_round(engine.global_state)
    transport.cancel_pending()
    engine.ledger.close_all()


def _finish_step(engine: RoundEngine, transport: CoordinatorTransport, aggregator: Any, step: _Step, in_flight: int) -> None:
    round_num = engine.round + 1
    engine.advance(aggregator, round_num)
    up1, down1 = transport.bytes_moved()
    st = step.staleness
    row = step.row(round_num, aggregator.count, step.clients, up1 - step.up0, down1 - step.down0)
    row.update(
        {
            "sync": "async",
            "staleness_mean": sum(st) / len(st) if st else 0.0,
            "staleness_min": min(st) if st else 0.0,
            "staleness_max": max(st) if st else 0.0,
            "dropped_stale": step.rejected.get("too_stale", 0),
            "lost": step.lost,
            "dispatched": step.dispatched,
            "in_flight": in_flight,
        }
    )
    row.update(client_ranks(engine.strategy, step.ranks, step.clients))
    engine.record(row, aggregator.count, step.t0, transport)
