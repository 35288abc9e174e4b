"""Fixtures for cluster transports: a real local Ray (started and shut down here) and tiny run configs."""

from __future__ import annotations

import os

import pytest
from cluster_testlib import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray with 2 CPUs, its temp dir under the test's tmp path; shut down afterwards."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's unix sockets live under the temp dir: keep the path short (AF_UNIX paths are <= 107 bytes)
    if ray.is_initialized():
        ray.shutdown()
    for attempt in (1, 2):
        temp = tmp_path_factory.mktemp("ray")
        try:
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), logging_level="WARNING", log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001
            # Ray's own start-up under a loaded CI machine ("The current node timed out during
            # startup": its raylet did not register within Ray's fixed 30 s; "Timed out waiting for
            # file ...gcs_server_port...": its GCS did not come up in time) fails now and then;
            # one more try with a fresh temp dir, then the error stands
            ray.shutdown()
            startup = ("timed out during startup", "Timed out waiting for file")
            if attempt == 2 or not any(s in str(exc) for s in startup):
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def simulate_reference(tmp_path_factory):
    """(run_dir, final checkpoint) of the tiny run through gRPC `dpeft simulate` (2 worker processes)."""
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.validate import load_config
    from dpeft_launch.simulate import run_coordinator

    run_dir = tmp_path_factory.mktemp("sim")
    cfg = load_config(None, tiny(run_dir))
    run_coordinator(cfg, "127.0.0.1:0", local_workers=cfg.simulate.processes, resume=False, quiet=True)
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found[0] == cfg.rounds
    return run_dir, found
