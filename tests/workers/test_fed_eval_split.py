"""Each client's held-out split (eval.federated): seeded, disjoint from training, never in a
training batch; and the worker's evaluation task scores exactly that split (real MiniLM)."""

from __future__ import annotations

import pytest

from dpeft.adapters import extract_state
from dpeft.codec import encode_state
from dpeft.config.parse import config_to_dict
from dpeft.data import partition
from dpeft.rounds.fedeval import EVALUATE, client_split, held_out_count
from dpeft.train import batch_schedule, evaluate, task_seed
from dpeft.transport.base import TrainTask, WorkerConnection, WorkerRegistration
from dpeft.validate import load_config
from dpeft_workers.evaluate import EMPTY_REPLY
from dpeft_workers.loop import run_worker
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
        want = evaluate(rt.model, rt.data.rows(held), cfg.model.task, cfg.train.eval_batch_size)
        assert metrics["eval_loss"] == pytest.approx(want["eval_loss"]) and metrics["eval_accuracy"] == want["eval_accuracy"]
    # without eval.federated every example trains, as before
    off = load_config(None, [*BASE, f"run_dir={tmp_path}"])
    rt.cfg = off
    assert [rt.client_indices(c) for c in range(3)] == [list(p) for p in parts]
    assert rt.held_out_indices(0) == []


class _Conn(WorkerConnection):
    """In-memory connection handing out ``tasks`` once; records what the worker declared and pushed."""

    def __init__(self, cfg_tree: dict, tasks: list[TrainTask]) -> None:
        self.cfg_tree, self.tasks, self.pushed, self.declared = cfg_tree, tasks, [], None

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        self.declared = self.task_kinds
        return WorkerRegistration("run", "s", self.cfg_tree, [], 5.0)

    def poll(self) -> TrainTask | float | str:
        raise AssertionError("poll_many is used")

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        out, self.tasks = self.tasks, []
        return out or "done"

    def fetch(self, task: TrainTask) -> bytes:
        return b"payload"

    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        self.pushed.append((task.task_id, num_examples))
        return True, ""

    def leave(self) -> None:
        pass


class _Runtime:
    """Records which tasks were trained and which evaluated."""

    lockstep_clients = 1

    def __init__(self, cfg) -> None:
        self.cfg, self.trained, self.evaluated = cfg, [], []

    def train_tasks(self, items, should_stop=None):
        self.trained += [t.task_id for t, _ in items]
        return [(b"u", 5, {}) for _ in items]

    def evaluate_tasks(self, items):
        self.evaluated += [t.task_id for t, _ in items]
        return [(EMPTY_REPLY, 2, {"eval_loss": 0.5, "eval_accuracy": 1.0}) for _ in items]


def test_the_worker_declares_evaluation_and_never_trains_an_unknown_kind(tmp_path) -> None:
    cfg = load_config(None, [*BASE, f"run_dir={tmp_path}"])
    tasks = [
        TrainTask("t", 1, 0, "b", 0, b""),
        TrainTask("e", 1, 1, "b", 0, b"", kind=EVALUATE),
        TrainTask("g", 1, 2, "b", 0, b"", kind="generate"),
    ]
    conn, rt = _Conn(config_to_dict(cfg), tasks), _Runtime(cfg)
    assert run_worker(conn, "w0", runtime=rt) == 0  # type: ignore[arg-type]
    assert EVALUATE in conn.declared and "train" not in conn.declared  # evaluation (and secure-aggregation steps) declared
    assert rt.trained == ["t"] and rt.evaluated == ["e"]  # the unknown kind is refused, not trained
    assert conn.pushed == [("t", 5), ("e", 2)]
