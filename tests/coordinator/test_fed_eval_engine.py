"""Federated evaluation in the round engine (fake model and transport, no processes): when it runs,
what a row records, lost replies, and that it changes nothing about training."""

from __future__ import annotations

import heapq
import json
import time

import pytest
from enginelib import FakeTransport, Reply, _Due, make_engine

from dpeft.codec import encode_state
from dpeft.errors import ProtocolError, RejectedUpdate
from dpeft.rounds.fedeval import EVALUATE
from dpeft.state import AdapterState
from dpeft.transport.base import Event, Rejection, TaskResult, TrainTask


def rows(engine) -> list[dict]:
    return [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]


def client_metrics(client: int, round_num: int) -> tuple[float, float, int]:
    """(loss, accuracy, examples) a fake client reports for its held-out split."""
    return 0.1 * client + 0.01 * round_num, (client % 3) / 4, 2 + client


class EvalTransport(FakeTransport):
    """The fake transport with workers that run evaluation tasks (``evaluates``) and reply with metrics.

    ``eval_reply(task)`` returns the delay before a reply, or None for a lost one."""

    def __init__(self, behaviour, engine, clients, evaluates: bool = True, eval_reply=lambda task: 0.0) -> None:
        super().__init__(behaviour, engine, clients)
        self.evaluates = evaluates
        self.eval_reply = eval_reply
        self.eval_tasks: list[TrainTask] = []

    def workers(self):
        kinds = [EVALUATE] if self.evaluates else []
        return {"w0": {"alive": True, "left": False, "own_data": False, "client_ids": [], "task_kinds": kinds}}

    def submit(self, tasks, pinned) -> None:
        evals = [t for t in tasks if t.kind == EVALUATE]
        super().submit([t for t in tasks if t.kind != EVALUATE], pinned)
        for task in evals:
            self.eval_tasks.append(task)
            delay = self.eval_reply(task)
            if delay is not None:
                with self._lock:
                    heapq.heappush(self._heap, _Due(time.time() + delay, next(self._seq), ("eval", task)))

    def _deliver(self, *event) -> Event:
        if event[0] != "eval":
            return super()._deliver(*event)
        task = event[1]
        loss, acc, n = client_metrics(task.client_id, task.round)
        payload = encode_state(AdapterState())
        try:
            dec = self.engine.decoder_for(task.task_id, task.client_id)
            dec.feed(payload)
            state = dec.finish()
        except (ProtocolError, RejectedUpdate) as exc:
            return Rejection(task.task_id, "w0", getattr(exc, "reason", "malformed"), str(exc))
        return TaskResult(task.task_id, task.client_id, "w0", state, n, {"eval_loss": loss, "eval_accuracy": acc}, len(payload))


def make(tmp_path, overrides, behaviour=lambda t, s: Reply(), **kw):
    engine, _ = make_engine(tmp_path, overrides, behaviour)
    return engine, EvalTransport(behaviour, engine, engine.cfg.clients, **kw)


def test_evaluated_rounds_record_weighted_client_metrics_and_training_is_unchanged(tmp_path) -> None:
    base = ["rounds=3", "clients=6", "clients_per_round=2", "train.eval_every=2"]
    engine, tr = make(tmp_path / "fe", [*base, "eval.federated=true", "eval.clients=3"])
    engine.run(tr)
    out = rows(engine)
    assert [r["round"] for r in out] == [0, 1, 2, 3]
    assert not any(k.startswith("fed_eval") for r in out[:2] for k in r)  # round 0 and an unevaluated round
    for r in out[2:]:
        sampled = r["fed_eval_sampled"]
        assert len(sampled) == 3 and r["fed_eval_failed"] == 0
        per = r["fed_eval_clients"]
        assert sorted(int(c) for c in per) == sampled
        for c in sampled:
            loss, acc, n = client_metrics(c, r["round"])
            assert per[str(c)] == pytest.approx({"loss": loss, "accuracy": acc, "examples": n})
        n = sum(m["examples"] for m in per.values())
        assert r["fed_eval_examples"] == n
        assert r["fed_eval_loss"] == pytest.approx(sum(m["loss"] * m["examples"] for m in per.values()) / n)
        assert r["fed_eval_accuracy"] == pytest.approx(sum(m["accuracy"] * m["examples"] for m in per.values()) / n)
    assert all(t.kind == EVALUATE and t.round in (2, 3) for t in tr.eval_tasks) and len(tr.eval_tasks) == 6
    # the same run without federated evaluation trains the same clients to the same global
    plain, tr2 = make(tmp_path / "plain", base)
    plain.run(tr2)
    assert [r["sampled"] for r in rows(plain)[1:]] == [r["sampled"] for r in out[1:]]
    assert [(t.round, t.client_id) for t in tr2.submitted] == [(t.round, t.client_id) for t in tr.submitted]
    assert all(plain.global_state[k].equal(engine.global_state[k]) for k in plain.global_state.tensors)


def test_a_lost_evaluation_reply_does_not_block_the_round(tmp_path) -> None:
    lost = lambda task: None if task.client_id == 0 else 0.01  # noqa: E731 - client 0 never answers
    engine, tr = make(
        tmp_path,
        ["rounds=2", "clients=4", "clients_per_round=2", "eval.federated=true", "eval.clients=4", "sync.task_timeout_s=0.3"],
        eval_reply=lost,
    )
    t0 = time.time()
    engine.run(tr)
    assert time.time() - t0 < 10
    for r in rows(engine)[1:]:
        assert r["fed_eval_failed"] == 1 and r["fed_eval_failed_reasons"] == {"0": "timeout"}
        assert sorted(r["fed_eval_clients"]) == ["1", "2", "3"]
        assert r["rejected"] == 0  # no evaluation reply counts as a training rejection
    assert len([t for t in tr.forgotten if "e-c0-" in t]) == 2


def test_no_evaluating_worker_means_no_federated_metrics(tmp_path) -> None:
    """Workers that did not declare the evaluate kind (older ones) get no evaluation task."""
    engine, tr = make(tmp_path, ["rounds=1", "clients=3", "clients_per_round=2", "eval.federated=true"], evaluates=False)
    engine.run(tr)
    row = rows(engine)[-1]
    assert row["fed_eval_sampled"] == [] and row["fed_eval_examples"] == 0 and "fed_eval_loss" not in row
    assert tr.eval_tasks == []


def test_async_steps_are_evaluated(tmp_path) -> None:
    beh = lambda t, s: Reply(delay_s=0.02 * (1 + t.client_id % 3))  # noqa: E731
    engine, tr = make(
        tmp_path,
        [
            "rounds=3",
            "clients=5",
            "clients_per_round=2",
            "sync.name=async",
            "sync.buffer_size=2",
            "sync.concurrency=3",
            "eval.federated=true",
        ],
        beh,
    )
    engine.run(tr)
    out = rows(engine)
    assert [r["round"] for r in out] == [0, 1, 2, 3]
    for r in out[1:]:
        assert len(r["fed_eval_sampled"]) == 2 and r["fed_eval_failed"] == 0 and "fed_eval_loss" in r
        assert r["clients"] == 2  # training updates that arrived during an evaluation still count


def test_late_training_updates_arriving_during_evaluation_are_still_folded(tmp_path) -> None:
    slow = lambda t, s: Reply(delay_s=0.0 if t.client_id % 2 == 0 else 0.6)  # noqa: E731
    eval_slow = lambda task: 0.8  # the evaluation outlasts the slow clients' training  # noqa: E731
    engine, tr = make(
        tmp_path,
        [
            "rounds=2",
            "clients=8",
            "clients_per_round=2",
            "sync.name=deadline",
            "sync.over_selection=2",
            "sync.late_updates=fold",
            "eval.federated=true",
        ],
        slow,
        eval_reply=eval_slow,
    )
    engine.run(tr)
    out = rows(engine)
    assert out[2]["late_folded"] >= 1 and out[2]["rejected"] == 0
