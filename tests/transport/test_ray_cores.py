"""`dpeft ray` on a local Ray: the actors and the coordinator's evaluation share a core budget
(``simulate.work_conserving``), as `dpeft simulate`'s worker processes do."""

from __future__ import annotations

import pytest
from cluster_testlib import tiny

pytest.importorskip("ray")

pytestmark = pytest.mark.integration


def test_ray_actors_train_on_a_shared_core_budget(ray_local, tmp_path):
    from dpeft.train.cores import CoreBudget
    from dpeft.validate import load_config
    from dpeft_launch.ray_cli import run_ray

    more = ["ray.actors=2", "ray.num_cpus=1", "clients=3", "clients_per_round=3", "model.max_length=24"]
    cfg = load_config(None, tiny(tmp_path / "ray", *more))
    rows = run_ray(cfg, resume=False, quiet=True)
    assert [r["round"] for r in rows] == list(range(cfg.rounds + 1)) and all(r["clients"] == 3 for r in rows[1:])
    stats = CoreBudget(tmp_path / "ray" / "cores.budget", 0).stats()
    assert stats["budget"] == 2 and stats["claimed"] == 0 and 1 <= stats["peak"] <= 2
    assert sum(stats["steps"][:2]) >= 3 * cfg.train.local_steps * cfg.rounds  # every actor step went through the budget
    assert stats["steps"][2] > 0  # and so did the coordinator's evaluation
