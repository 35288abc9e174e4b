"""All-reduce rounds: FedAvg-style rounds on a ``torch.distributed`` group, no coordinator in the path.

Every rank trains its share of the round's seeded sample with the worker runtime it is given
(anything with ``train_tasks``, e.g. :class:`~dpeft_workers.runtime.WorkerRuntime`), folds its
updates into the strategy's streaming aggregator, and the group all-reduces the weighted sums
(:mod:`dpeft.transport.distributed_allreduce`). Every rank then takes the same server step, so
all hold the same global; rank 0 alone evaluates and records (metrics, checkpoints, resume,
PEFT export) through the round core. With ``eval.federated`` every rank also evaluates its share
of each evaluated round's seeded evaluation sample on those clients' held-out examples, and an
all-reduce sums each client's loss, correct predictions and examples (:mod:`dpeft.rounds.fedeval`). Strategies whose aggregate is not a weighted mean of
deltas (flora, flexlora, robust medians) are refused with a config error.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dpeft.codec import decode_state, encode_state
from dpeft.codec.validation import check_update
from dpeft.config import RunConfig, dump_config
from dpeft.errors import ConfigError, DpeftError, RejectedUpdate
from dpeft.rounds.fedeval import EVALUATE, FedEvalTally, eval_sample_size, evaluation_due, sample_eval_clients
from dpeft.rounds.global_model import GlobalModel
from dpeft.rounds.plots import prewarm as prewarm_plots
from dpeft.rounds.recorder import RoundRecorder
from dpeft.rounds.sampling import sample_clients
from dpeft.rounds.tally import RoundTally, evaluate_into, finish_step, strategy_metrics
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.aggregate import StreamingWeightedMean
from dpeft.strategies.base import unwrap
from dpeft.transport.base import TrainTask
from dpeft.transport.distributed_allreduce import allreduce_weighted_sum, broadcast_state, init_group, ring_bytes_per_rank

log = logging.getLogger("dpeft.allreduce")


class TaskTrainer(Protocol):
    """What trains a rank's clients: (task, payload) pairs in, (update bytes, examples, metrics) out, in order
    (``evaluate_tasks``: the same for evaluation tasks, with ``eval.federated``)."""

    def train_tasks(self, items: list[tuple[TrainTask, bytes]]) -> Any: ...

    def evaluate_tasks(self, items: list[tuple[TrainTask, bytes]]) -> Any: ...


def allreduce_aggregator(aggregator: Any, extra: Sequence[float] = (), group: Any = None) -> list[float]:
    """Turn a rank-local streaming weighted mean into the group-wide one (in place).

    ``aggregator`` is a strategy aggregator (wrappers such as clipping are looked through) whose
    innermost part is a :class:`StreamingWeightedMean`; afterwards ``aggregator.result()`` is
    the FedAvg of every rank's updates. Returns the all-reduced ``extra`` scalars.
    """
    inner = unwrap(aggregator)
    if not isinstance(inner, StreamingWeightedMean):
        raise TypeError(f"{type(inner).__name__} is not a weighted mean; it cannot be all-reduced")
    # StreamingWeightedMean keeps sum_i w_i * delta_i (float64) in _sum and sum_i w_i in _weight.
    total, count, extra_sums = allreduce_weighted_sum(list(inner._sum.values()), inner._weight, inner._count, extra, group)
    inner._weight = total
    inner._count = count
    return extra_sums


def allreduce_fedavg(updates: Sequence[ClientUpdate], template: AdapterState, group: Any = None) -> AdapterState:
    """FedAvg (example-weighted mean delta) of all ranks' ``updates`` (a rank may have none)."""
    agg = StreamingWeightedMean(template)
    for u in updates:
        agg.add(u)
    allreduce_aggregator(agg, group=group)
    return agg.result()


def warn_collective_ignores(cfg: RunConfig, prog: str, mode: str) -> list[str]:
    """Warn that all-reduce rounds cannot simulate stragglers and dropouts; returns the ignored keys."""
    ignored = [key for key, on in (("simulate.speed_factors", bool(cfg.simulate.speed_factors)), ("simulate.dropout", cfg.simulate.dropout > 0)) if on]
    if ignored:
        print(
            f"{prog}: warning: {' and '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with {mode} "
            "(synchronous all-reduce rounds; simulate.byzantine_clients still apply)",
            file=sys.stderr,
            flush=True,
        )
    return ignored


def check_strategy(strategy: Any, state: AdapterState) -> None:
    """:class:`ConfigError` unless ``strategy`` aggregates by a float64 weighted mean (what all-reduce sums)."""
    inner = unwrap(strategy.make_aggregator(state))
    if not isinstance(inner, StreamingWeightedMean):
        raise ConfigError(
            "strategy.name",
            f"{strategy.name!r} aggregates with {type(inner).__name__}, which all-reduce cannot compute; "
            "use a weighted-mean strategy (fedavg, fedprox, fedavgm, fedadam, ...) or the coordinator transports",
        )
    if inner.dtype != torch.float64:
        raise ConfigError(
            "strategy.options.accumulator",
            "all-reduce sums float64 buffers across ranks; use accumulator: float64 (the default) or the coordinator transports",
        )


def _train_share(runtime: TaskTrainer, round_num: int, mine: list[int], payload: bytes, hp: dict[str, Any], schema: Any, aggregator: Any, tally: RoundTally) -> None:
    """Train this rank's clients of the round (together with train.lockstep, else one after another) into ``aggregator``."""
    tasks = [
        TrainTask(task_id=f"r{round_num}-c{c}", round=round_num, client_id=c, blob_id=f"r{round_num}", blob_size=len(payload), blob_sha256=b"", hyperparams=hp)
        for c in mine
    ]
    for c, (update, n, m) in zip(mine, runtime.train_tasks([(t, payload) for t in tasks]), strict=True):
        delta = decode_state(update, schema=schema)
        try:
            if n <= 0:
                raise RejectedUpdate("num_examples", "an update must report at least one example")
            check_update(delta)
        except RejectedUpdate:
            tally.reject("non_finite")
            continue
        client_update = ClientUpdate(c, delta, int(n), m)
        aggregator.add(client_update)
        tally.add(client_update, n)


def _fed_eval_share(runtime: TaskTrainer, cfg: RunConfig, strategy: Any, glob: AdapterState, round_num: int, rank: int, world: int) -> dict[str, Any]:
    """Federated evaluation on the group: every rank evaluates its share of the round's seeded
    evaluation sample, and one all-reduce sums each client's (loss x examples, accuracy x examples,
    examples); returns the ``fed_eval_*`` fields (every rank gets them)."""
    sampled = sample_eval_clients(cfg.seed, round_num, list(range(cfg.clients)), eval_sample_size(cfg))
    tally = FedEvalTally(sampled)
    hp = strategy.configure_train(round_num, glob)
    hp = {"personal": hp["personal"]} if hp.get("personal") else {}
    payload = encode_state(AdapterState(glob.tensors, {**glob.meta, "round": round_num}))
    mine = sampled[rank::world]
    tasks = [
        TrainTask(f"r{round_num}e-c{c}", round_num, c, f"e{round_num}", len(payload), b"", hp, kind=EVALUATE)
        for c in mine
    ]
    table = torch.zeros(len(sampled), 3, dtype=torch.float64)
    for c, (_, n, m) in zip(mine, runtime.evaluate_tasks([(t, payload) for t in tasks]) if tasks else [], strict=True):
        if n > 0:
            table[sampled.index(c)] = torch.tensor([m["eval_loss"] * n, m["eval_accuracy"] * n, float(n)], dtype=torch.float64)
    if len(sampled):
        allreduce_weighted_sum([table], 0.0, 0)
    for i, c in enumerate(sampled):
        n = float(table[i, 2])
        if n > 0:
            tally.add(c, {"eval_loss": float(table[i, 0]) / n, "eval_accuracy": float(table[i, 1]) / n}, int(round(n)))
        else:
            tally.fail(c, "num_examples")
    return tally.row()


def run_allreduce(cfg: RunConfig, runtime: TaskTrainer, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """All rounds on the current process group. Call on every rank; rank 0's metrics rows are returned."""
    if not dist.is_initialized():
        init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    strategy = make_strategy(cfg.strategy)
    run_dir = Path(cfg.run_dir)
    gm: GlobalModel | None = None
    recorder: RoundRecorder | None = None
    glob: AdapterState | None = None
    strat_state = AdapterState()
    if rank == 0:
        gm = GlobalModel(cfg)
        glob = gm.initial_state()
        model = gm
        recorder = RoundRecorder(
            run_dir, cfg.rounds, cfg.seed, export=lambda state: model.export(state, run_dir / "adapter"), config_text=dump_config(cfg), elapsed=False, cfg=cfg
        )
        found = recorder.resume(glob.schema()) if resume else None
        start_round = 0
        if found is not None:
            start_round, glob = found.round, found.global_state
            strat_state = AdapterState(OrderedDict(found.strategy_state))
        else:
            recorder.start_over()  # an earlier run's rounds would outrank this one's
        glob.meta = {**glob.meta, "round": start_round}
    # every rank starts from rank 0's global adapter, round and server-optimizer state
    glob = broadcast_state(glob)
    strat_state = broadcast_state(strat_state if rank == 0 else None)
    if len(strat_state):
        strategy.load_state_dict(dict(strat_state.tensors))
    start_round = int(glob.meta.get("round", 0))
    check_strategy(strategy, glob)
    schema = glob.schema()
    payload_bytes = sum(t.numel() for t in glob.tensors.values()) * 8 + 8 * 3
    per_rank = ring_bytes_per_rank(payload_bytes, world)

    if recorder is not None and not quiet:
        prewarm_plots()
    if recorder is not None and gm is not None and recorder.needs_round0():
        recorder.write(recorder.round0_row(gm.evaluate, glob))

    for round_num in range(start_round + 1, cfg.rounds + 1):
        t0 = time.time()
        sampled = sample_clients(cfg.seed, round_num, list(range(cfg.clients)), cfg.clients_per_round)
        payload = encode_state(AdapterState(glob.tensors, {**glob.meta, "round": round_num}))
        hp = strategy.configure_train(round_num, glob)
        aggregator = strategy.begin_round(glob)
        tally = RoundTally()
        _train_share(runtime, round_num, sampled[rank::world], payload, hp, schema, aggregator, tally)
        train_s = time.time() - tally.t0
        t_reduce = time.time()
        loss_sum, loss_n = tally.loss_sums()
        loss_sum, loss_n, examples, rejected = allreduce_aggregator(aggregator, [loss_sum, loss_n, tally.num_examples, sum(tally.rejected.values())])
        reduce_s = time.time() - t_reduce
        count = aggregator.count
        if count == 0:
            raise DpeftError(f"round {round_num}: no valid update on any rank")
        glob = finish_step(strategy, glob, aggregator, round_num)
        fed: dict[str, Any] = {}
        if cfg.eval.federated and evaluation_due(round_num, cfg.train.eval_every, cfg.rounds):
            fed = _fed_eval_share(runtime, cfg, strategy, glob, round_num, rank, world)
        if recorder is not None and gm is not None:
            row: dict[str, Any] = {
                "round": round_num,
                "clients": count,
                "sampled": sampled,
                "num_examples": int(examples),
                "train_loss": loss_sum / loss_n if loss_n else None,
                "bytes_up": per_rank * world,
                "bytes_down": per_rank * world,
                "rejected": int(rejected),
                "rejected_reasons": {"non_finite": int(rejected)} if rejected else {},
                "transport": "allreduce",
                "world_size": world,
                "allreduce_s": reduce_s,
                "rank0_train_s": train_s,
            }
            evaluate_into(row, gm.evaluate, glob, round_num, cfg.train.eval_every, cfg.rounds)
            row.update(fed)
            row.update(strategy_metrics(strategy, count))
            recorder.close(row, glob, strategy.state_dict(), t0)
    if recorder is None or recorder.metrics is None:
        return []
    recorder.export(glob)
    if not quiet:  # the table, the plots and the closing line (the Ray driver prints its own)
        recorder.metrics.print_summary(recorder.rows, recorder.started)
    elif recorder.metrics.tracker is not None:
        recorder.metrics.tracker.finish()
    return recorder.rows
