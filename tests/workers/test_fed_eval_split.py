"""Each client's held-out split (eval.federated): seeded, disjoint from training, never in a
training batch; and the worker's evaluation task scores exactly that split (real MiniLM)."""

from __future__ import annotations

import pytest

from dpeft.adapters import extract_state
from dpeft.codec import encode_state
from dpeft.data import partition
from dpeft.rounds.fedeval import EVALUATE, client_split, held_out_count
from dpeft.train import batch_schedule, evaluate, task_seed
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.evaluate import EMPTY_REPLY, subset
from dpeft_workers.runtime import WorkerRuntime

BASE = [
    "clients=3",
    "clients_per_round=2",
    "data.max_train_examples=90",
    "data.test_examples=16",
    "model.max_length=24",
    "train.local_steps=4",
    "train.batch_size=8",
]


def test_client_split_is_seeded_disjoint_and_sized() -> None:
    indices = list(range(100, 140))
    train, held = client_split(indices, 0.1, seed=3, client_id=2)
    assert len(held) == 4 and sorted(train + held) == indices and not set(train) & set(held)
    assert train == [i for i in indices if i not in held]  # training keeps its order
    assert client_split(indices, 0.1, seed=3, client_id=2) == (train, held)
    assert client_split(indices, 0.1, seed=3, client_id=1)[1] != held  # per client
    assert client_split(indices, 0.1, seed=4, client_id=2)[1] != held  # per seed
    assert [held_out_count(n, 0.1) for n in (0, 1, 2, 5, 10, 26)] == [0, 0, 1, 1, 1, 3]  # at least 1, one left to train
    assert client_split([7], 0.5, 0, 0) == ([7], [])


def test_held_out_examples_never_train_and_evaluation_scores_them(tmp_path) -> None:
    cfg = load_config(None, [*BASE, f"run_dir={tmp_path}", "eval.federated=true", "eval.client_test_fraction=0.2"])
    rt = WorkerRuntime(cfg)
    parts = partition(
        [int(x) for x in rt.data.labels],
        cfg.clients,
        cfg.data.partition,
        cfg.seed,
        cfg.data.dirichlet_alpha,
        cfg.data.min_examples_per_client,
    )
    payload = encode_state(extract_state(rt.model))
    for c in range(cfg.clients):
        train, held = rt.client_indices(c), rt.held_out_indices(c)
        assert held and sorted(train + held) == sorted(parts[c]) and not set(train) & set(held)
        for r in (1, 2, 3):
            for batch in batch_schedule(train, cfg.train.local_steps, cfg.train.batch_size, task_seed(cfg.seed, r, c)):
                assert not set(batch) & set(held)
        # the evaluation task: the held-out split's loss and accuracy, its size, no tensors
        task = TrainTask(f"e-c{c}", 1, c, "b", len(payload), b"", {}, kind=EVALUATE)
        ((reply, n, metrics),) = rt.evaluate_tasks([(task, payload)])
        assert reply == EMPTY_REPLY and n == len(held)
        want = evaluate(rt.model, subset(rt.data, held), cfg.model.task, cfg.train.eval_batch_size)
        assert metrics["eval_loss"] == pytest.approx(want["eval_loss"]) and metrics["eval_accuracy"] == want["eval_accuracy"]
    # without eval.federated every example trains, as before
    off = load_config(None, [*BASE, f"run_dir={tmp_path}"])
    rt.cfg = off
    assert [rt.client_indices(c) for c in range(3)] == [list(p) for p in parts]
    assert rt.held_out_indices(0) == []
