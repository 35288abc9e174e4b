"""Evaluation tasks on a worker: the global adapter scored on a client's held-out examples.

The worker side of federated evaluation (``eval.federated``, the design is in
:mod:`dpeft.rounds.fedeval`). An evaluation task's payload is decoded and loaded into the
worker's shared model exactly as for training (the adapter of the payload's LoRA rank, the
client's personal tensors when the strategy keeps some), evaluated with
:func:`dpeft.train.evaluate` on the client's held-out examples, and answered with an empty adapter
container, the number of held-out examples and ``eval_loss`` / ``eval_accuracy`` (plus
``compute_s``). Nothing is trained and no client state changes.

The held-out examples are a seeded slice of the client's partition (:func:`dpeft.rounds.fedeval.client_split`),
taken out of its training examples only while ``eval.federated`` is on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dpeft.adapters import load_state
from dpeft.codec import encode_state
from dpeft.config import RunConfig
from dpeft.errors import ProtocolError
from dpeft.rounds.fedeval import EVALUATE, client_split
from dpeft.state import AdapterState
from dpeft.train import evaluate
from dpeft.transport.base import TrainTask

if TYPE_CHECKING:
    from dpeft_workers.runtime import WorkerRuntime

#: the payload of every evaluation reply: an adapter container without tensors
EMPTY_REPLY = encode_state(AdapterState())


def split_indices(cfg: RunConfig, indices: list[int], client_id: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of a client whose partition is ``indices``: the held-out split
    exists only with ``eval.federated`` (otherwise every example trains, as before)."""
    if not cfg.eval.federated:
        return list(indices), []
    return client_split(indices, cfg.eval.client_test_fraction, cfg.seed, client_id)


def evaluate_tasks(runtime: WorkerRuntime, items: list[tuple[TrainTask, Any]]) -> list[tuple[bytes, int, dict[str, float]]]:
    """Run evaluation tasks on ``runtime``'s shared model: (empty payload, held-out examples, metrics) per task, in order.

    A client without held-out examples answers 0 examples (refused, counted as a failed evaluation);
    a task of another kind raises :class:`ProtocolError`."""
    decoded: dict[int, AdapterState] = {}
    out = []
    for task, payload in items:
        if task.kind != EVALUATE:
            raise ProtocolError(f"task {task.task_id} is not an evaluation task (kind {task.kind!r})")
        held = runtime.held_out_indices(task.client_id)
        if not held:  # a client with a single example holds none out: the coordinator refuses 0 examples
            out.append((EMPTY_REPLY, 0, {}))
            continue
        t0 = time.perf_counter()
        runtime.place()  # the training device and precision (the base may be stored in bf16 there)
        prepared = runtime._prepare(task, payload, decoded)
        runtime._use_adapter(prepared.adapter)
        load_state(runtime.model, prepared.start)
        metrics = evaluate(
            runtime.model, runtime.data.rows(held), runtime.cfg.model.task, runtime.cfg.train.eval_batch_size, runtime.cfg.train.precision
        )
        compute_s = time.perf_counter() - t0
        out.append((EMPTY_REPLY, len(held), {**{k: float(v) for k, v in metrics.items()}, "compute_s": compute_s}))
    return out
