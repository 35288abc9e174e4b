"""The `async` sync policy's loop: FedBuff-style buffered asynchronous aggregation.

Up to ``concurrency`` tasks are in flight; each starts from the global current when it was
dispatched, and a freed slot is refilled at once with a client that is not busy (seeded
choice). Accepted updates fold into the strategy's aggregator with their example weight
scaled by ``s(tau)`` (``tau`` = aggregation steps since dispatch; beyond ``max_staleness``
they are rejected as ``too_stale``). Every ``buffer_size`` accepted updates the strategy
finishes a step: new global, evaluation (every ``train.eval_every`` steps), checkpoint, and
one ``metrics.jsonl`` line with staleness statistics. ``rounds`` counts steps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from dpeft.errors import RejectedUpdate
from dpeft.transport.base import CoordinatorTransport, Rejection

if TYPE_CHECKING:
    from dpeft.coordinator.engine import RoundEngine

log = logging.getLogger("dpeft.coordinator")


class _Step:
    """Statistics of the aggregation step being filled."""

    def __init__(self, transport: CoordinatorTransport) -> None:
        self.t0 = time.time()
        self.up0, self.down0 = transport.bytes_moved()
        self.rejected: Counter[str] = Counter()
        self.losses: list[tuple[float, int]] = []
        self.staleness: list[float] = []
        self.clients: list[int] = []
        self.ranks: dict[str, int] = {}
        self.num_examples = 0
        self.lost = 0
        self.dispatched = 0


def run_async(engine: RoundEngine, transport: CoordinatorTransport) -> None:
    """Run aggregation steps until ``engine.round == cfg.rounds`` or ``engine.stop_event`` is set."""
    from dpeft.coordinator.engine import RoundTimeout

    cfg = engine.cfg
    policy = engine.policy
    buffer_size = policy.buffer_size()  # type: ignore[attr-defined]
    concurrency = policy.concurrency(cfg.clients)  # type: ignore[attr-defined]
    _, pinned = engine._wait_for_workers(transport)
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
        eligible, pinned = engine._eligible(transport)
        busy = set(inflight.values())
        free = [c for c in eligible if c not in busy]
        want = min(concurrency - len(inflight), len(free))
        if want > 0:
            rng = np.random.default_rng([cfg.seed, engine.round, seq])
            pick = sorted(int(c) for c in rng.choice(free, size=want, replace=False))
            tasks, _ = engine.make_tasks(transport, engine.round + 1, pick, {**hp, "task_seq": seq}, tag=f"a{seq}")
            seq += 1
            for t in tasks:
                inflight[t.task_id] = t.client_id
            transport.submit(tasks, pinned)
            step.dispatched += len(tasks)
        _, lost = engine._expire(transport, list(inflight), pinned)
        if lost:
            step.lost += lost
            with engine._lock:
                for tid in [t for t in inflight if t not in engine._open]:
                    inflight.pop(tid)
        if time.time() - step.t0 > cfg.sync.round_timeout_s:
            transport.cancel_pending()
            raise RoundTimeout(
                f"async step {engine.round + 1}: {aggregator.count}/{buffer_size} updates after {cfg.sync.round_timeout_s:.0f}s "
                "(raise sync.round_timeout_s, set sync.task_timeout_s, or check the workers)"
            )
        event = transport.next_event(timeout=0.2)
        if event is None:
            continue
        if isinstance(event, Rejection):
            step.rejected[event.reason] += 1
            _close(engine, inflight, event.task_id)
            continue
        try:
            update = engine._accept(event)
            aggregator.add(update)
        except RejectedUpdate as exc:
            log.warning("rejected update from %s: %s", event.worker_id, exc)
            step.rejected[exc.reason] += 1
            _close(engine, inflight, event.task_id)
            continue
        finally:
            inflight.pop(event.task_id, None)
        step.num_examples += event.num_examples
        step.clients.append(update.client_id)
        step.staleness.append(float(update.metrics.get("staleness", 0.0)))
        if "lora_rank" in update.metrics:
            step.ranks[str(update.client_id)] = int(update.metrics["lora_rank"])
        if "train_loss" in update.metrics:
            step.losses.append((update.metrics["train_loss"], event.num_examples))
        engine.metrics.progress(f"async step {engine.round + 1}/{cfg.rounds}: {aggregator.count}/{buffer_size} updates, {len(inflight)} in flight")
        if aggregator.count >= min_updates:
            _finish_step(engine, transport, aggregator, step, len(inflight))
            step = _Step(transport)
            aggregator = engine.strategy.begin_round(engine.global_state)
    transport.cancel_pending()
    with engine._lock:
        engine._done.update(engine._open)
        engine._open = {}
        engine._info.clear()


def _close(engine: RoundEngine, inflight: dict[str, int], task_id: str) -> None:
    """Forget a task whose update was refused (its slot is free again)."""
    inflight.pop(task_id, None)
    with engine._lock:
        if engine._open.pop(task_id, None) is not None:
            engine._info.pop(task_id, None)
            engine._done.add(task_id)


def _finish_step(engine: RoundEngine, transport: CoordinatorTransport, aggregator: Any, step: _Step, in_flight: int) -> None:
    cfg = engine.cfg
    round_num = engine.round + 1
    meta = {**engine.global_state.meta, "round": round_num}
    engine.global_state = engine.strategy.finish_round(engine.global_state, aggregator)
    engine.global_state.meta = meta
    engine.round = round_num
    up1, down1 = transport.bytes_moved()
    st = step.staleness
    row: dict[str, Any] = {
        "round": round_num,
        "clients": aggregator.count,
        "sampled": step.clients,
        "num_examples": step.num_examples,
        "train_loss": sum(loss * n for loss, n in step.losses) / max(sum(n for _, n in step.losses), 1) if step.losses else None,
        "bytes_up": up1 - step.up0,
        "bytes_down": down1 - step.down0,
        "rejected": sum(step.rejected.values()),
        "rejected_reasons": dict(step.rejected),
        "sync": "async",
        "staleness_mean": sum(st) / len(st) if st else 0.0,
        "staleness_min": min(st) if st else 0.0,
        "staleness_max": max(st) if st else 0.0,
        "dropped_stale": step.rejected.get("too_stale", 0),
        "lost": step.lost,
        "dispatched": step.dispatched,
        "in_flight": in_flight,
    }
    if step.ranks and any(engine.strategy.client_key(c) is not None for c in step.clients):
        row["client_ranks"] = step.ranks
    if round_num % cfg.train.eval_every == 0 or round_num == cfg.rounds:
        t_eval = time.time()
        row.update(engine.gm.evaluate(engine.global_state))
        row["eval_s"] = time.time() - t_eval
    extra = getattr(engine.strategy, "last_metrics", None)
    if extra:
        row.update(extra)
    engine._save(round_num)
    row["wall_s"] = time.time() - step.t0
    row["elapsed_s"] = time.time() - engine.started
    engine.metrics.append(row)
