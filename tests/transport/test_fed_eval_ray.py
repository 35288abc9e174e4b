"""Federated evaluation on Ray: actors evaluate the global adapter on their clients' held-out splits."""

from __future__ import annotations

import pytest
from cluster_testlib import tiny

pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def test_ray_actors_run_evaluation_tasks(ray_local, tmp_path):
    from dpeft.codec import encode_state
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.rounds.fedeval import EVALUATE
    from dpeft.transport.base import TrainTask
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray
    from dpeft_workers.runtime import WorkerRuntime

    more = ["ray.actors=2", "ray.num_cpus=1", "clients=3", "model.max_length=32", "eval.federated=true", "eval.clients=3"]
    cfg = load_config(None, tiny(tmp_path / "ray", *more))
    rows = run_ray(cfg, resume=False, quiet=True)
    row = rows[-1]
    per = row["fed_eval_clients"]
    assert row["fed_eval_sampled"] == [0, 1, 2] and sorted(per) == ["0", "1", "2"] and row["fed_eval_failed"] == 0
    n = sum(m["examples"] for m in per.values())
    assert row["fed_eval_examples"] == n
    assert row["fed_eval_accuracy"] == pytest.approx(sum(m["accuracy"] * m["examples"] for m in per.values()) / n, rel=1e-9)
    # each client's numbers are the final global's on its held-out split
    found = latest_checkpoint(tmp_path / "ray" / "checkpoints")
    assert found is not None and found[0] == 1
    rt = WorkerRuntime(cfg)
    payload = encode_state(found[1])
    for c, m in per.items():
        ((_, k, got),) = rt.evaluate_tasks(
            [(TrainTask(f"check-{c}", 1, int(c), "b", len(payload), b"", {}, kind=EVALUATE), payload)]
        )
        assert k == m["examples"] and got["eval_loss"] == pytest.approx(m["loss"], abs=1e-5)
