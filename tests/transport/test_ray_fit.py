"""A placement group the cluster can never hold fails at once (naming ray.actors and the per-actor resources)."""

from __future__ import annotations

import time

import pytest

from dpeft.errors import ConfigError
from dpeft.transport.ray_fit import placement_problem
from dpeft.transport.ray_pool import RayActorPool, RayActorSpec

NODES = [{"CPU": 8.0, "edge": 8.0}, {"CPU": 8.0, "edge": 8.0}, {"CPU": 4.0, "GPU": 1.0, "cloud": 1.0}]


def test_placement_arithmetic() -> None:
    assert placement_problem({"CPU": 2.0, "edge": 1.0}, 8, "SPREAD", NODES) is None  # 4 + 4
    assert "room for 9" in placement_problem({"CPU": 2.0, "edge": 1.0}, 9, "PACK", NODES)
    assert placement_problem({"CPU": 2.0}, 4, "STRICT_PACK", NODES) is None
    assert "one node with room for all 5" in placement_problem({"CPU": 2.0}, 5, "STRICT_PACK", NODES)
    assert placement_problem({"CPU": 1.0}, 3, "STRICT_SPREAD", NODES) is None
    assert "4 nodes" in placement_problem({"CPU": 1.0}, 4, "STRICT_SPREAD", NODES)
    assert "no node has the resource tpu" in placement_problem({"CPU": 1.0, "tpu": 1.0}, 1, "PACK", NODES)
    assert placement_problem({"GPU": 0.5}, 2, "PACK", NODES) is None and placement_problem({"GPU": 0.5}, 3, "PACK", NODES)


class _Idle:
    def ready(self) -> bool:
        return True


def test_a_local_cluster_refuses_a_group_it_can_never_hold_at_once(ray_local) -> None:
    pool = RayActorPool(RayActorSpec(actors=3, num_cpus=2, startup_timeout_s=600), _Idle, restartable=False, always_place=True)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        pool.start(lambda worker_id, threads: ())
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert err.value.key == "ray.actors" and "ray.num_cpus" in msg and "CPU=2" in msg and "room for 3" in msg
    pool.shutdown()
