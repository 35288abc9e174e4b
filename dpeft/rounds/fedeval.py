"""Federated evaluation: sampled clients evaluate the global adapter on their own held-out data.

A coordinator that holds no test data of its own still learns how the global adapter does
(``eval.federated: true``). The pieces every driver shares live here; the coordinator engine
(:mod:`dpeft_coordinator.evaluation`), the worker runtime (:mod:`dpeft_workers.evaluate`) and
the all-reduce rounds (:mod:`dpeft.rounds.allreduce`) use them.

The design:

- **Held-out split.** Each client's held-out split is a seeded, deterministic slice of its
  partition: ``eval.client_test_fraction`` of its examples (at least one, and at least one
  left to train on), drawn from (seed, client id) only (:func:`client_split`). It is removed
  from the client's training examples only when ``eval.federated`` is on, so runs without it
  train on exactly what they trained on before.
- **The evaluation task.** A task whose ``kind`` is ``"evaluate"`` (:data:`EVALUATE`): the
  worker loads the global adapter it is sent into its shared model (with the client's personal
  tensors when the strategy keeps some, as for training), evaluates on the client's held-out
  examples and replies with ``eval_loss``, ``eval_accuracy`` and the example count only. The
  reply travels the ordinary checked upload path with an empty adapter container as payload: the
  coordinator's decoder for an evaluation task admits no tensor at all.
- **Old workers.** A gRPC worker declares the task kinds it runs besides training when it joins
  (``JoinRequest.task_kinds``); the coordinator hands an evaluation task only to a worker that
  declared ``"evaluate"``, so an older worker, which would ignore the kind and train, never gets
  one. A worker that receives a kind it does not know refuses it (no reply) instead of training.
- **When.** After the aggregation of every evaluated round (``train.eval_every``; the last
  round always; the asynchronous policy: its evaluated aggregation steps; never the untrained
  round 0, which only the coordinator evaluates), on ``eval.clients``
  clients (null: ``clients_per_round``) drawn with a seeded generator of their own
  (:func:`sample_eval_clients`), so turning federated evaluation on does not change which
  clients train.
- **What is recorded.** The round's metrics row gets ``fed_eval_loss`` and ``fed_eval_accuracy``
  (means weighted by the clients' held-out examples), ``fed_eval_examples``, ``fed_eval_clients``
  (client id -> its ``loss``, ``accuracy`` and ``examples``), ``fed_eval_sampled``,
  ``fed_eval_failed`` (sampled clients without a result) and ``fed_eval_s``
  (:class:`FedEvalTally`). The row is checkpointed with the round, so a resumed run keeps it.
- **Lost replies.** An evaluation never blocks or fails a round: the coordinator waits for the
  sampled clients' results until ``sync.task_timeout_s`` (when set) or ``sync.round_timeout_s``
  has passed since the evaluation tasks were sent, or the run stops; a refused or lost result
  counts in ``fed_eval_failed`` and the round is recorded with what arrived (no ``fed_eval_loss``
  when nothing did).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dpeft.transport.base import TrainTask

#: the ``TrainTask.kind`` of an evaluation task ("" or "train": a training task)
EVALUATE = "evaluate"
#: the task kinds a current worker runs besides training (declared when it joins)
WORKER_TASK_KINDS = (EVALUATE,)
#: mixed into the seeds of evaluation sampling and the held-out split (independent of training's streams)
_EVAL_STREAM = 0xE7A1


def is_evaluation(task: TrainTask) -> bool:
    """Whether ``task`` is an evaluation task."""
    return task.kind == EVALUATE


def evaluation_due(round_num: int, eval_every: int, rounds: int) -> bool:
    """Whether round ``round_num`` is evaluated (every ``eval_every`` rounds and the last one)."""
    return round_num % eval_every == 0 or round_num == rounds


def held_out_count(n: int, fraction: float) -> int:
    """How many of a client's ``n`` examples are held out: ``round(n * fraction)``, at least 1,
    and at most ``n - 1`` (a client keeps one example to train on; one with a single example holds none out)."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(round(n * fraction))))


def client_split(indices: list[int], fraction: float, seed: int, client_id: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of a client's ``indices``: a seeded slice depending only
    on (``seed``, ``client_id``, the indices); training keeps the original order, held-out is sorted."""
    k = held_out_count(len(indices), fraction)
    if k == 0:
        return list(indices), []
    rng = np.random.default_rng([seed, client_id, _EVAL_STREAM])
    picked = set(int(p) for p in rng.permutation(len(indices))[:k])
    held = sorted(int(indices[p]) for p in picked)
    train = [int(i) for p, i in enumerate(indices) if p not in picked]
    return train, held


def sample_eval_clients(seed: int, round_num: int, eligible: list[int], size: int) -> list[int]:
    """The seeded evaluation sample of a round: min(size, len(eligible)) of ``eligible``, sorted.

    Drawn from a generator of its own (seed, round, a fixed stream tag): training's sample
    (:func:`dpeft.rounds.sampling.sample_clients`) is the same with or without federated evaluation."""
    if not eligible or size <= 0:
        return []
    rng = np.random.default_rng([seed, round_num, _EVAL_STREAM])
    return sorted(int(c) for c in rng.choice(sorted(eligible), size=min(size, len(eligible)), replace=False))


def eval_sample_size(cfg: Any) -> int:
    """``eval.clients`` (null: ``clients_per_round``)."""
    return int(cfg.eval.clients if cfg.eval.clients is not None else cfg.clients_per_round)


def eval_wait_s(cfg: Any) -> float:
    """How long the coordinator waits for evaluation results: ``sync.task_timeout_s`` when set and
    shorter, else ``sync.round_timeout_s``."""
    limit = float(cfg.sync.round_timeout_s)
    if cfg.sync.task_timeout_s is not None:
        limit = min(limit, float(cfg.sync.task_timeout_s))
    return limit


class FedEvalTally:
    """The results of one federated evaluation and the ``fed_eval_*`` fields of its row."""

    def __init__(self, sampled: list[int]) -> None:
        self.t0 = time.time()
        self.sampled = list(sampled)
        self.clients: dict[int, dict[str, float]] = {}
        self.failed: dict[int, str] = {}
        self.bytes_up = 0
        self.bytes_down = 0

    def add(self, client_id: int, metrics: dict[str, float], examples: int) -> None:
        """The result of ``client_id``: its ``eval_loss``, ``eval_accuracy`` over ``examples`` held-out examples."""
        self.clients[client_id] = {
            "loss": float(metrics["eval_loss"]),
            "accuracy": float(metrics["eval_accuracy"]),
            "examples": int(examples),
        }

    def fail(self, client_id: int, reason: str) -> None:
        if client_id not in self.clients:
            self.failed[client_id] = reason

    @property
    def pending(self) -> list[int]:
        """Sampled clients with neither a result nor a failure yet."""
        return [c for c in self.sampled if c not in self.clients and c not in self.failed]

    def row(self) -> dict[str, Any]:
        """``fed_eval_*`` fields: example-weighted loss and accuracy (absent when no result arrived)."""
        n = sum(int(m["examples"]) for m in self.clients.values())
        out: dict[str, Any] = {
            "fed_eval_sampled": self.sampled,
            "fed_eval_examples": n,
            "fed_eval_clients": {str(c): dict(self.clients[c]) for c in sorted(self.clients)},
            "fed_eval_failed": len(self.sampled) - len(self.clients),
            "fed_eval_s": time.time() - self.t0,
        }
        if n:
            out["fed_eval_loss"] = sum(m["loss"] * m["examples"] for m in self.clients.values()) / n
            out["fed_eval_accuracy"] = sum(m["accuracy"] * m["examples"] for m in self.clients.values()) / n
        if self.failed:
            out["fed_eval_failed_reasons"] = {str(c): r for c, r in sorted(self.failed.items())}
        if self.bytes_up or self.bytes_down:
            out["fed_eval_bytes_up"] = self.bytes_up
            out["fed_eval_bytes_down"] = self.bytes_down
        return out
