"""The Ray transport on a real local Ray: same math as gRPC simulate, survives a killed actor."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from cluster_testlib import FakeDecoder, FakeTrainActor, register_by_value, task, tiny

pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _run_tasks(t, tasks, expect: int, timeout_s: float = 60.0) -> dict:
    """Start ``t``, publish payload "p", submit ``tasks``; {task id: (event, seconds after submit)} of up to ``expect`` replies."""
    t.start()
    t.publish_blob("p", b"payload!")
    t0 = time.time()
    t.submit(tasks, {})
    got = {}
    while len(got) < expect and time.time() - t0 < timeout_s:
        event = t.next_event(timeout=0.5)
        if event is not None:
            got[event.task_id] = (event, time.time() - t0)
    return got


def test_ray_run_matches_grpc_simulate(ray_local, simulate_reference, tmp_path):
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.state import max_abs_diff
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray

    sim_dir, (sim_round, sim_global, _, _) = simulate_reference
    cfg = load_config(None, tiny(tmp_path / "ray", "ray.actors=2", "ray.num_cpus=1"))
    rows = run_ray(cfg, resume=False, quiet=True)
    assert ray_local.is_initialized()  # run_ray leaves a Ray it did not start running
    found = latest_checkpoint(tmp_path / "ray" / "checkpoints")
    assert found is not None and found[0] == sim_round == 1
    assert max_abs_diff(found[1], sim_global) <= 1e-6
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").exists()
    sim_rows = _rows(sim_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and rows[1]["sampled"] == sim_rows[1]["sampled"]
    assert rows[1]["num_examples"] == sim_rows[1]["num_examples"]
    assert abs(rows[1]["train_loss"] - sim_rows[1]["train_loss"]) < 1e-6
    assert abs(rows[1]["eval_loss"] - sim_rows[1]["eval_loss"]) < 1e-5
    # the payload crossed once per actor, each update once
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0


def test_killed_actor_is_restarted_and_the_round_completes(ray_local, tmp_path):
    from dpeft.config import config_to_dict
    from dpeft.rounds.global_model import GlobalModel
    from dpeft.transport.ray_transport import RayCoordinatorTransport
    from dpeft.validate import load_config
    from dpeft_coordinator.engine import RoundEngine
    from dpeft_launch.ray_cli import actor_spec
    from dpeft_workers.ray_actor import TrainActor
    from dpeft_workers.simulate import Heterogeneity

    cfg = load_config(None, tiny(tmp_path / "run", "train.local_steps=8", "ray.actors=2", "ray.max_restarts=3"))
    engine = RoundEngine(cfg, GlobalModel(cfg), tmp_path / "run", resume=False)
    transport = RayCoordinatorTransport(
        config_tree=config_to_dict(cfg), decoder_factory=engine.decoder_for, spec=actor_spec(cfg), actor_cls=TrainActor, heterogeneity=Heterogeneity(cfg)
    )
    transport.start()
    pids_before = {k: v["pid"] for k, v in transport.workers().items()}
    killed: list[str] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            try:
                running = transport.in_flight()
            except RuntimeError:  # the engine thread changed the dict under us
                continue
            if running:
                time.sleep(0.3)  # mid-task: the actor is training
                try:
                    running = transport.in_flight()  # still running now? (a fast machine may be done)
                except RuntimeError:
                    continue
                if running:
                    worker = sorted(running.values())[0]
                    ray_local.kill(transport.actor_handles()[worker], no_restart=False)
                    killed.append(worker)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        rows = engine.run(transport)
        thread.join(timeout=5)
        # the round may finish on the other actor before the restarted one answers its probe;
        # keep pumping the transport (as the engine would next round) until it has rejoined
        deadline = time.time() + 60
        while killed and time.time() < deadline and transport.workers()[killed[0]]["pid"] == pids_before[killed[0]]:
            transport.next_event(timeout=0.2)
        workers = transport.workers()
    finally:
        transport.shutdown("test over")
    assert killed, "no task was ever in flight"
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["clients"] == 2 for r in rows[1:])
    victim = workers[killed[0]]
    assert victim["restarts"] >= 1 and victim["alive"]
    assert victim["pid"] != pids_before[killed[0]]  # Ray restarted it (max_restarts), and it rejoined the pool


def test_actors_form_a_gloo_group_and_all_reduce(ray_local):
    """`aggregation: allreduce` under `dpeft ray`: actors set up torch.distributed the standard way and reduce to FedAvg."""
    from dpeft.transport.ray_transport import RayActorSpec
    from dpeft_launch.ray_cli import RayAllReduceGroup

    rng = np.random.default_rng(0)
    per_rank = [([rng.standard_normal((3, 4)), rng.standard_normal(5)], w) for w in (3.0, 5.0)]
    group = RayAllReduceGroup(RayActorSpec(actors=2, num_cpus=0.5, placement_strategy="PACK"), backend="gloo")
    try:
        group.start()
        out = group.reduce(per_rank)
    finally:
        group.shutdown()
    expect = [(per_rank[0][0][i] * 3.0 + per_rank[1][0][i] * 5.0) / 8.0 for i in range(2)]
    for arrays, total in out:
        assert total == 8.0
        for got, want in zip(arrays, expect, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_flexlora_with_three_client_ranks_completes(ray_local, tmp_path, monkeypatch):
    """One payload per distinct client rank (3 > keep_blobs): every task finds its payload."""
    from dpeft.transport.ray_transport import RayCoordinatorTransport
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray

    monkeypatch.setattr(RayCoordinatorTransport, "keep_blobs", 0)  # only what tasks need (and the round's payloads) is kept
    overrides = [
        "seed=0",
        "rounds=1",
        "clients=3",
        "clients_per_round=3",
        "train.local_steps=2",
        "data.max_train_examples=150",
        "data.test_examples=32",
        "data.partition=iid",
        "model.layers=1",  # payload ranks are asserted, not learning
        "model.max_length=24",
        "strategy.name=flexlora",
        "strategy.options.client_ranks=[2,4,8]",
        "sync.round_timeout_s=300",
        "ray.actors=2",
        "ray.num_cpus=1",
        f"run_dir={tmp_path / 'flex'}",
    ]
    rows = run_ray(load_config(None, overrides), resume=False, quiet=True)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 3 and not rows[1].get("rejected")
    assert rows[1]["client_ranks"] == {"0": 2, "1": 4, "2": 8}
    assert _rows(tmp_path / "flex")[1]["client_ranks"] == {"0": 2, "1": 4, "2": 8}  # the metrics line


def test_hetlora_and_lora_fair_on_ray(ray_local, tmp_path):
    """hetlora: per-client truncated payloads, ranks pruned in round 1 are what round 2 sends; lora_fair completes."""
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray

    # ranks and residuals are asserted, not learning: a 1-layer base on short sequences
    base = ["seed=0", "clients=3", "clients_per_round=3", "train.local_steps=2", "data.max_train_examples=150",
            "data.test_examples=32", "data.partition=iid", "sync.round_timeout_s=300", "ray.actors=2", "ray.num_cpus=1",
            "model.layers=1", "model.max_length=24"]  # fmt: skip
    het = [*base, "rounds=2", "adapter.r=8", "strategy.name=hetlora", "strategy.options={client_ranks: [4, 8], prune_threshold: 0.9}"]
    rows = run_ray(load_config(None, [*het, f"run_dir={tmp_path / 'het'}"]), resume=False, quiet=True)
    assert [r["round"] for r in rows] == [0, 1, 2] and not any(r.get("rejected") for r in rows)
    assert rows[1]["client_ranks"] == {"0": 4, "1": 8, "2": 4}
    assert rows[2]["client_ranks"] == {"0": 3, "1": 6, "2": 3}
    fair = [*base, "rounds=1", "strategy.name=lora_fair", f"run_dir={tmp_path / 'fair'}"]
    rows = run_ray(load_config(None, fair), resume=False, quiet=True)
    assert rows[1]["clients"] == 3 and rows[1]["lora_fair_residual_after"] <= rows[1]["lora_fair_residual_before"]


def test_payloads_are_kept_while_tasks_or_the_round_need_them(ray_local):
    """Pruning: queued/running tasks' payloads, the newest round's payloads, then the newest keep_blobs."""
    from dpeft.config import config_to_dict
    from dpeft.transport.ray_transport import RayCoordinatorTransport
    from dpeft.validate import load_config

    t = RayCoordinatorTransport(config_tree=config_to_dict(load_config(None, [])), decoder_factory=lambda tid, cid: FakeDecoder(), actor_cls=FakeTrainActor)
    try:
        for name in ("a2", "a4", "a8"):  # flexlora: one payload per client rank
            t.publish_blob(name, name.encode() * 4)
        t.submit([task("t0", 0, "a2"), task("t1", 1, "a4"), task("t2", 2, "a8")], {})
        t.forget_tasks(["t0"])
        assert set(t._blobs) == {"a2", "a4", "a8"}  # unneeded now, but the engine may hand a2 out again this round
        t.submit([task("t3", 3, "a2", task_seq=1)], {})  # an async refill reusing the round's payload
        t.publish_blob("b2", b"b2" * 4)
        t.submit([task("u0", 0, "b2", round_num=2)], {})
        assert set(t._blobs) == {"a2", "a4", "a8", "b2"}  # all still queued
        t.forget_tasks(["t1", "t3"])
        assert set(t._blobs) == {"a8", "b2"}  # a2/a4: unneeded, an old round, not among the newest 2
        t.cancel_pending()
        t.publish_blob("c2", b"c2" * 4)
        t.submit([task("v0", 0, "c2", round_num=3)], {})
        assert set(t._blobs) == {"b2", "c2"}
    finally:
        t.shutdown("test over")


def test_simulated_dropout_and_slow_clients(ray_local):
    """simulate.dropout: no reply, as drawn in simulate workers; speed_factors: the reply is held back, the actor is free."""
    from dpeft.config import config_to_dict
    from dpeft.transport.ray_transport import RayActorSpec, RayCoordinatorTransport
    from dpeft.validate import load_config
    from dpeft_workers.simulate import Heterogeneity

    register_by_value()
    cfg = load_config(None, ["clients=4", "clients_per_round=2", "simulate.dropout=0.4", "simulate.speed_factors=[1, 4]"])
    spec = RayActorSpec(actors=2, num_cpus=0.5, placement_strategy=None)
    t = RayCoordinatorTransport(
        config_tree=config_to_dict(cfg), decoder_factory=lambda tid, cid: FakeDecoder(), spec=spec, actor_cls=FakeTrainActor, heterogeneity=Heterogeneity(cfg)
    )
    tasks = [task(f"s{seq}-c{c}", c, "p", task_seq=seq) for seq in range(2) for c in range(4)]
    sim = Heterogeneity(cfg)
    kept = {x.task_id for x in tasks if not sim.drops(x)}
    assert 0 < len(kept) < len(tasks)
    try:
        got = _run_tasks(t, tasks, len(kept))
        time.sleep(0.3)
        assert t.next_event(timeout=0.2) is None  # the dropped tasks never answer
        done = sum(w["tasks_done"] for w in t.workers().values())
    finally:
        t.shutdown("test over")
    assert set(got) == kept and done == len(kept)
    delay = (4 - 1) * FakeTrainActor.compute_s
    for event, at in got.values():
        assert event.client_id % 2 == 0 or event.metrics["simulated_delay_s"] == pytest.approx(delay)
        if event.client_id % 2 == 1:
            assert at >= delay
        else:
            assert "simulated_delay_s" not in event.metrics
    assert any(e.client_id % 2 == 1 for e, _ in got.values())


def test_lockstep_hands_each_actor_a_share_of_the_round(ray_local):
    """train.lockstep: an idle actor gets ceil(queued tasks of the round / idle actors) tasks in one train_many call."""
    from dpeft.config import config_to_dict
    from dpeft.transport.ray_transport import RayActorSpec, RayCoordinatorTransport
    from dpeft.validate import load_config
    from dpeft_workers.simulate import Heterogeneity

    register_by_value()
    cfg = load_config(
        None, ["clients=8", "clients_per_round=6", "train.lockstep=true", "model.dropout=0", "simulate.speed_factors=[1, 3]"]
    )
    spec = RayActorSpec(actors=2, num_cpus=0.5, placement_strategy=None)
    t = RayCoordinatorTransport(
        config_tree=config_to_dict(cfg), decoder_factory=lambda tid, cid: FakeDecoder(), spec=spec, actor_cls=FakeTrainActor, heterogeneity=Heterogeneity(cfg)
    )
    tasks = [task(f"r1-c{c}", c, "p") for c in range(6)]
    try:
        got = {tid: event for tid, (event, _at) in _run_tasks(t, tasks, len(tasks)).items()}
        done = {w: v["tasks_done"] for w, v in t.workers().items()}
    finally:
        t.shutdown("test over")
    assert set(got) == {x.task_id for x in tasks}
    assert sorted(done.values()) == [3, 3]  # 6 tasks, 2 idle actors: 3 each, one call per actor
    for event in got.values():
        assert event.metrics["batch"] == 3
        # a slow client in a lockstep call is still held back on its own
        assert ("simulated_delay_s" in event.metrics) == (event.client_id % 2 == 1)


def test_ray_actors_train_on_a_shared_core_budget(ray_local, tmp_path):
    """``simulate.work_conserving`` on a local Ray: the actors and the coordinator's evaluation
    share a core budget, as `dpeft simulate`'s worker processes do."""
    from dpeft.train.cores import CoreBudget
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray

    more = ["ray.actors=2", "ray.num_cpus=1", "clients=3", "clients_per_round=3", "model.max_length=24", "simulate.work_conserving=true"]
    cfg = load_config(None, tiny(tmp_path / "ray", *more))
    rows = run_ray(cfg, resume=False, quiet=True)
    assert [r["round"] for r in rows] == list(range(cfg.rounds + 1)) and all(r["clients"] == 3 for r in rows[1:])
    stats = CoreBudget(tmp_path / "ray" / "cores.budget", 0).stats()
    assert stats["budget"] == 2 and stats["claimed"] == 0 and 1 <= stats["peak"] <= 2
    assert sum(stats["steps"][:2]) >= 3 * cfg.train.local_steps * cfg.rounds  # every actor step went through the budget
    assert stats["steps"][2] > 0  # and so did the coordinator's evaluation
