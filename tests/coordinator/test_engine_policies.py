"""The round engine under each sync policy, on a fake model and an in-memory transport (no processes)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from enginelib import R, Reply, default_update, lora_state, make_engine

from dpeft.state import AdapterState
from dpeft_coordinator.engine import RoundTimeout


def rows(engine) -> list[dict]:
    return [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sync_waits_for_everyone_and_averages(tmp_path) -> None:
    engine, tr = make_engine(tmp_path, ["rounds=2", "clients=4", "clients_per_round=3"], lambda t, s: Reply(delay_s=0.01 * t.client_id))
    engine.run(tr)
    out = rows(engine)
    assert [r["round"] for r in out] == [0, 1, 2]
    assert all(r["clients"] == 3 for r in out[1:])
    # every delta is +1, FedAvg server_lr 1: two rounds move every tensor by +2
    assert torch.allclose(engine.global_state["classifier.weight"], torch.full((2, 5), 2.0))


def test_sync_round_timeout_fails_loudly(tmp_path) -> None:
    engine, tr = make_engine(
        tmp_path, ["rounds=1", "clients=3", "clients_per_round=3", "sync.round_timeout_s=0.5"], lambda t, s: None if t.client_id == 1 else Reply()
    )
    with pytest.raises(RoundTimeout, match=r"round 1: 2/3 updates"):
        engine.run(tr)


def test_sync_reassigns_a_dropped_task(tmp_path) -> None:
    # the first attempt of client 1 is dropped; the re-assigned attempt answers
    behaviour = lambda t, s: None if (t.client_id == 1 and t.hyperparams.get("attempt", 0) == 0) else Reply()  # noqa: E731
    engine, tr = make_engine(tmp_path, ["rounds=1", "clients=3", "clients_per_round=3", "sync.task_timeout_s=0.3"], behaviour)
    engine.run(tr)
    row = rows(engine)[-1]
    assert row["clients"] == 3 and row["reassigned"] == 1
    attempts = [t.hyperparams.get("attempt", 0) for t in tr.submitted if t.client_id == 1]
    assert attempts == [0, 1]
    assert len({t.task_id for t in tr.submitted if t.client_id == 1}) == 1  # same task: only one reply can count


def test_deadline_over_selects_and_closes_at_quorum(tmp_path) -> None:
    slow = lambda t, s: Reply(delay_s=0.0 if t.client_id % 2 == 0 else 1.5)  # noqa: E731
    engine, tr = make_engine(
        tmp_path,
        ["rounds=2", "clients=8", "clients_per_round=2", "sync.name=deadline", "sync.over_selection=2", "sync.deadline_s=30"],
        slow,
    )
    engine.run(tr)
    out = rows(engine)
    for r in out[1:]:
        assert len(r["sampled"]) == 4 and r["clients"] == 2 and r["sync"] == "deadline"
        assert r["wall_s"] < 1.4  # closed at quorum, not waiting for the slow half or the deadline


def test_deadline_closes_at_deadline_and_drops_late_updates(tmp_path) -> None:
    # client 1 never answers; client 2 answers 0.5 s after its task, after the 0.3 s deadline
    def beh(t, s):
        if t.client_id == 1:
            return None
        if t.client_id == 2:
            return Reply(delay_s=0.5)
        return Reply(delay_s=0.0 if t.round == 1 else 0.4)

    engine, tr = make_engine(
        tmp_path,
        ["rounds=2", "clients=3", "clients_per_round=3", "sync.name=deadline", "sync.over_selection=1", "sync.deadline_s=0.3"],
        beh,
    )
    engine.run(tr)
    r1, r2 = rows(engine)[1:]
    # the deadline closed it with one update (client 2 answers at 0.5 s; wall_s also holds the checkpoint write)
    assert r1["clients"] == 1 and 0.3 <= r1["wall_s"] < 1.0
    assert r2["clients"] == 1 and r2["rejected_reasons"] == {"late": 1}  # client 2's round-1 update came too late


def test_deadline_folds_late_updates_with_staleness_weight(tmp_path) -> None:
    # client 1 is slow: its round-1 update arrives in round 2 and is folded with weight s(1) = 2^-0.5
    # quorum 1. Round 1: client 0 answers at once (closing it), client 1 after 0.4 s.
    # Round 2: both answer after 1.5 s, so client 1's round-1 update arrives first, is folded, and closes it.
    beh = lambda t, s: Reply(delay_s=(0.0 if t.client_id == 0 else 0.4) if t.round == 1 else 1.5)  # noqa: E731
    engine, tr = make_engine(
        tmp_path,
        [
            "rounds=2", "clients=2", "clients_per_round=2", "sync.name=deadline", "sync.over_selection=1",
            "sync.quorum=1", "sync.deadline_s=30", "sync.late_updates=fold", "sync.staleness=polynomial", "sync.staleness_a=0.5",
        ],
        beh,
    )
    engine.run(tr)
    out = rows(engine)
    assert out[1]["clients"] == 1 and out[1]["sampled"] == [0, 1]
    assert out[2]["late_folded"] == 1 and out[2]["staleness_max"] == 1.0
    assert out[2]["clients"] == 1 and out[2]["wall_s"] < 1.4  # the folded update counts towards the quorum


def test_deadline_fold_drops_updates_beyond_max_staleness(tmp_path) -> None:
    # round 1 closes at its 0.2 s deadline without client 1, whose update lands during round 2
    beh = lambda t, s: Reply(delay_s=(0.0 if t.client_id == 0 else 0.4) if t.round == 1 else 0.8)  # noqa: E731
    engine, tr = make_engine(
        tmp_path,
        [
            "rounds=2", "clients=2", "clients_per_round=2", "sync.name=deadline", "sync.over_selection=1", "sync.quorum=2",
            "sync.deadline_s=0.2", "sync.late_updates=fold", "sync.max_staleness=0",
        ],
        beh,
    )
    engine.run(tr)
    out = rows(engine)
    assert sum(r.get("late_folded", 0) for r in out) == 0
    assert sum(r["rejected_reasons"].get("late", 0) + r["rejected_reasons"].get("too_stale", 0) for r in out[1:]) >= 1


def test_async_aggregates_every_k_with_staleness_stats(tmp_path) -> None:
    beh = lambda t, s: Reply(delay_s=0.05 * (1 + t.client_id % 3))  # noqa: E731
    engine, tr = make_engine(
        tmp_path,
        ["rounds=4", "clients=6", "clients_per_round=2", "sync.name=async", "sync.buffer_size=2", "sync.concurrency=4", "sync.staleness=hinge", "sync.staleness_b=0"],
        beh,
    )
    engine.run(tr)
    out = rows(engine)
    steps = out[1:]
    assert [r["round"] for r in steps] == [1, 2, 3, 4]
    assert all(r["clients"] == 2 and r["sync"] == "async" for r in steps)
    for key in ("staleness_mean", "staleness_min", "staleness_max", "dropped_stale", "in_flight", "eval_accuracy", "elapsed_s"):
        assert all(key in r for r in steps), key
    assert max(r["staleness_max"] for r in steps) >= 1  # with 4 in flight and K=2, some updates are stale
    assert len(tr.submitted) >= 8
    # no client ever has two tasks in flight: dispatch seeds differ per task
    seqs = [t.hyperparams["task_seq"] for t in tr.submitted]
    assert seqs == sorted(seqs)


def test_async_frees_slots_of_lost_tasks(tmp_path) -> None:
    beh = lambda t, s: None if t.client_id == 0 else Reply(delay_s=0.25)  # noqa: E731
    engine, tr = make_engine(
        tmp_path,
        ["rounds=3", "clients=4", "clients_per_round=2", "sync.name=async", "sync.concurrency=4", "sync.task_timeout_s=0.3"],
        beh,
    )
    engine.run(tr)
    out = rows(engine)
    assert len(out) == 4 and sum(r["lost"] for r in out[1:]) >= 1
    assert tr.forgotten


def test_flexlora_sends_each_client_its_own_rank(tmp_path) -> None:
    engine, tr = make_engine(
        tmp_path,
        ["rounds=2", "clients=3", "clients_per_round=3", "adapter.r=4", "strategy.name=flexlora", "strategy.options={client_ranks: [1, 2, 4]}"],
        lambda t, s: Reply(),
    )
    engine.run(tr)
    want = {0: 1, 1: 2, 2: 4}
    assert len(tr.received) == 6
    for _, client, state in tr.received:
        assert state["layer.q.lora_A.weight"].shape[0] == want[client]
        assert state["layer.v.lora_B.weight"].shape[1] == want[client]
    # one payload per distinct rank per round
    assert len({t.blob_id for t in tr.submitted}) == 6
    assert engine.global_state["layer.q.lora_A.weight"].shape[0] == R
    assert all(r["clients"] == 3 for r in rows(engine)[1:])


def test_flexlora_rejects_an_update_of_the_wrong_rank(tmp_path) -> None:
    def wrong(t, s):
        if t.client_id == 0:  # sends rank-4 factors although it was sent rank 1
            return Reply(make=lambda task, rec: default_update(task, lora_state(4)))
        return Reply()

    engine, tr = make_engine(
        tmp_path,
        ["rounds=1", "clients=3", "clients_per_round=2", "adapter.r=4", "strategy.name=flexlora", "strategy.options={client_ranks: [1, 2, 4]}",
         "sync.name=deadline", "sync.over_selection=1.5", "sync.quorum=2", "sync.deadline_s=0.5"],
        wrong,
    )
    engine.run(tr)
    row = rows(engine)[-1]
    assert row["rejected_reasons"] == {"malformed": 1} and row["clients"] == 2


@pytest.mark.parametrize("name,omitted", [("ffa_lora", "lora_A"), ("fedsa_lora", "lora_B")])
def test_partial_strategies_leave_tensors_out_of_updates(tmp_path, name, omitted) -> None:
    sent: list[AdapterState] = []

    def beh(t, s):
        def make(task, rec):
            u = default_update(task, rec)
            sent.append(u)
            return u

        return Reply(make=make)

    engine, tr = make_engine(tmp_path, ["rounds=1", "clients=2", "clients_per_round=2", f"strategy.name={name}"], beh)
    before = engine.global_state.clone()
    engine.run(tr)
    assert sent and all(not any(f".{omitted}." in k for k in u.tensors) for u in sent)
    after = engine.global_state
    for k in after.tensors:
        moved = not torch.equal(after[k], before[k])
        assert moved == (f".{omitted}." not in k), k


def test_a_fresh_run_forgets_an_earlier_runs_checkpoints_and_a_resume_keeps_personal_state(tmp_path) -> None:
    """`--fresh` in a used run_dir: the earlier run's higher rounds must not outrank (or outlive) the new ones."""
    from dpeft.rounds.checkpoint import latest_checkpoint

    engine, tr = make_engine(tmp_path, ["rounds=3", "clients=2", "clients_per_round=2"], lambda t, s: Reply())
    engine.run(tr)
    ckpts = engine.run_dir / "checkpoints"
    assert latest_checkpoint(ckpts)[0] == 3
    personal = engine.run_dir / "personal"
    personal.mkdir()
    (personal / "client-0.safetensors").write_bytes(b"personal B of client 0")

    # resuming keeps the clients' personal state (fedsa_lora's B) and continues from round 3
    resumed, tr = make_engine(tmp_path, ["rounds=4", "clients=2", "clients_per_round=2"], lambda t, s: Reply(), resume=True)
    assert resumed.resumed_from == 3 and (personal / "client-0.safetensors").exists()

    # starting over: one round, and the newest checkpoint is that round, not the earlier run's round 3
    fresh, tr = make_engine(tmp_path, ["rounds=1", "clients=2", "clients_per_round=2"], lambda t, s: Reply())
    assert not personal.exists()
    fresh.run(tr)
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000001.safetensors"]
    assert latest_checkpoint(ckpts)[0] == 1
    assert [r["round"] for r in rows(fresh)] == [0, 1]


def test_rounds_wait_for_sync_min_workers(tmp_path) -> None:
    engine, tr = make_engine(tmp_path, ["rounds=1", "clients=2", "clients_per_round=2", "sync.min_workers=2"], lambda t, s: Reply())
    t0 = time.monotonic()
    one = {"alive": True, "left": False, "own_data": False, "client_ids": []}
    tr.workers = lambda: {"w0": one, "w1": one} if time.monotonic() - t0 > 0.4 else {"w0": one}  # w1 joins late
    submitted: list[float] = []
    submit = tr.submit
    tr.submit = lambda tasks, pinned: (submitted.append(time.monotonic() - t0), submit(tasks, pinned))[1]
    engine.run(tr)
    assert submitted and min(submitted) > 0.4  # round 1 began only once the second worker was there
    assert [r["round"] for r in rows(engine)] == [0, 1]


def test_too_few_workers_fail_the_run_after_the_round_timeout(tmp_path) -> None:
    engine, tr = make_engine(
        tmp_path, ["rounds=1", "clients=2", "clients_per_round=2", "sync.min_workers=3", "sync.round_timeout_s=0.5"], lambda t, s: Reply()
    )
    with pytest.raises(RoundTimeout, match=r"1/3 workers"):
        engine.run(tr)
