"""The Ray transport on a real local Ray: same math as gRPC simulate, survives a killed actor."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from cluster_testlib import tiny

pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_ray_run_matches_grpc_simulate(ray_local, simulate_reference, tmp_path):
    from dpeft.coordinator.checkpoint import latest_checkpoint
    from dpeft.launch.ray_cli import load_run_config, run_ray
    from dpeft.state import max_abs_diff

    sim_dir, (sim_round, sim_global, _, _) = simulate_reference
    cfg, rcfg = load_run_config(None, tiny(tmp_path / "ray", "ray.actors=2", "ray.num_cpus=1"))
    rows = run_ray(cfg, rcfg, resume=False, quiet=True)
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
    from dpeft.coordinator.engine import RoundEngine
    from dpeft.coordinator.global_model import GlobalModel
    from dpeft.launch.ray_cli import load_run_config
    from dpeft.transport.ray_transport import RayCoordinatorTransport

    cfg, rcfg = load_run_config(
        None, tiny(tmp_path / "run", "train.local_steps=8", "ray.actors=2", "ray.max_restarts=3")
    )
    from dpeft.config import config_to_dict

    engine = RoundEngine(cfg, GlobalModel(cfg), tmp_path / "run", resume=False)
    transport = RayCoordinatorTransport(config_tree=config_to_dict(cfg), decoder_factory=engine.decoder_for, spec=rcfg.spec(cfg))
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
                time.sleep(1.0)  # mid-task: the actor is training
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
    """`ray.mode: allreduce`: actors set up torch.distributed the standard way and reduce to FedAvg."""
    from dpeft.launch.ray_cli import RayAllReduceGroup
    from dpeft.transport.ray_transport import RayActorSpec

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
