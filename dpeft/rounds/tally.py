"""One aggregation step's accounting and the strategy step that closes it.

:class:`RoundTally` accumulates the admitted updates of a step (clients, examples, weighted
train loss, client compute, staleness, ranks, lockstep, refusals) and builds the common part of
its ``metrics.jsonl`` row; :func:`finish_step` takes the strategy's server step and stamps the
new global with its round; :func:`evaluate_into` adds the global evaluation when it is due.
Every driver (coordinator, split federation, all-reduce) builds its rows through these.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate


class RoundTally:
    """Statistics of the aggregation step being filled; ``sums`` names extra update metrics to add up."""

    def __init__(self, sums: Iterable[str] = ()) -> None:
        self.t0 = time.time()
        self.rejected: Counter[str] = Counter()
        self.losses: list[tuple[float, int]] = []
        self.staleness: list[float] = []  # of every admitted update (0.0 when fresh)
        self.clients: list[int] = []
        self.ranks: dict[str, int] = {}
        self.num_examples = 0
        self.compute_s = 0.0
        self.lockstep = 0  # updates a worker trained together with others (train.lockstep)
        self.sums: dict[str, float] = {k: 0 for k in sums}

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def add(self, update: ClientUpdate, num_examples: int) -> None:
        """An admitted update that reported ``num_examples`` examples (before any staleness scaling)."""
        m = update.metrics
        self.num_examples += num_examples
        self.clients.append(update.client_id)
        self.staleness.append(float(m.get("staleness", 0.0)))
        if "lora_rank" in m:
            self.ranks[str(update.client_id)] = int(m["lora_rank"])
        if "train_loss" in m:
            self.losses.append((m["train_loss"], num_examples))
        self.compute_s += float(m.get("compute_s", 0.0))
        self.lockstep += m.get("lockstep_clients", 1.0) > 1
        for key in self.sums:
            self.sums[key] += m.get(key, 0)

    def train_loss(self) -> float | None:
        """Example-weighted mean train loss of the updates that reported one."""
        if not self.losses:
            return None
        return sum(loss * n for loss, n in self.losses) / max(sum(n for _, n in self.losses), 1)

    def loss_sums(self) -> tuple[float, float]:
        """(sum of loss * examples, sum of examples) over the updates that reported a loss."""
        loss_sum = loss_n = 0.0
        for loss, n in self.losses:
            loss_sum += loss * n
            loss_n += n
        return loss_sum, loss_n

    def row(self, round_num: int, clients: int, sampled: list[int], bytes_up: int, bytes_down: int, reasons: bool = True) -> dict[str, Any]:
        """The fields every driver's row carries (``reasons``: with ``rejected_reasons``)."""
        row: dict[str, Any] = {
            "round": round_num,
            "clients": clients,
            "sampled": sampled,
            "num_examples": self.num_examples,
            "train_loss": self.train_loss(),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "rejected": sum(self.rejected.values()),
        }
        if reasons:
            row["rejected_reasons"] = dict(self.rejected)
        return row


def finish_step(strategy: Any, global_state: AdapterState, aggregator: Any, round_num: int) -> AdapterState:
    """The strategy's server step over ``aggregator`` (none without updates); the result is global round ``round_num``.

    Every round driver comes through here, so the adapter method's post-aggregation projection
    is applied here too (LoReFT: each R back to orthonormal rows, :func:`dpeft.adapters.native.post_aggregate`)."""
    from dpeft.adapters.native import post_aggregate

    meta = {**global_state.meta, "round": round_num}
    if aggregator.count:
        global_state = post_aggregate(strategy.finish_round(global_state, aggregator))
    global_state.meta = meta
    return global_state


def strategy_metrics(strategy: Any, count: int) -> dict[str, Any]:
    """The strategy's own metrics of the step just finished (``last_metrics``; none without updates)."""
    extra = getattr(strategy, "last_metrics", None)
    return dict(extra) if extra and count else {}


def client_ranks(strategy: Any, ranks: dict[str, int], clients: Iterable[int]) -> dict[str, Any]:
    """``{"client_ranks": ...}`` when the strategy sends per-client ranks (flexlora), else nothing."""
    if ranks and any(strategy.client_key(c) is not None for c in clients):
        return {"client_ranks": ranks}
    return {}


def evaluate_into(row: dict[str, Any], evaluate: Callable[[AdapterState], dict[str, float]], state: AdapterState, round_num: int, eval_every: int, rounds: int) -> None:
    """Add the global evaluation (and ``eval_s``) to ``row`` every ``eval_every`` rounds and at the last one."""
    if round_num % eval_every == 0 or round_num == rounds:
        t_eval = time.time()
        row.update(evaluate(state))
        row["eval_s"] = time.time() - t_eval
