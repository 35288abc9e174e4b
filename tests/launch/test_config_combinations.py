"""Settings that cannot run together are refused when the config is loaded: `dpeft` exits 2 with
one line naming the keys involved, before any model loads or process starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integration_testlib import assert_no_traceback

pytestmark = pytest.mark.integration

CASES = [
    # (id, arguments after `dpeft`, texts stderr must contain)
    ("allreduce-int8-up", ["simulate", "aggregation=allreduce", "codec.up=int8"], ["codec.up", "aggregation=allreduce"]),
    ("allreduce-topk-chain", ["simulate", "aggregation=allreduce", "codec.up=topk+int8"], ["codec.up", "aggregation=allreduce"]),
    ("allreduce-fp16-down", ["simulate", "aggregation=allreduce", "codec.down=fp16"], ["codec.down", "aggregation=allreduce"]),
    ("allreduce-median", ["simulate", "aggregation=allreduce", "strategy.name=median"], ["strategy.name", "aggregation=allreduce", "median"]),
    ("allreduce-flora", ["simulate", "aggregation=allreduce", "strategy.name=flora"], ["strategy.name", "aggregation=allreduce", "flora"]),
    (
        "allreduce-float32",
        ["simulate", "aggregation=allreduce", "strategy.options.accumulator=float32"],
        ["strategy.options.accumulator", "aggregation=allreduce"],
    ),
    ("coordinator-allreduce-int8", ["coordinator", "--listen", "127.0.0.1:0", "aggregation=allreduce", "codec.up=int8"], ["codec.up", "aggregation=allreduce"]),
    ("krum-too-few", ["simulate", "strategy.name=krum", "clients_per_round=4"], ["clients_per_round", "krum"]),
    ("flora-rank", ["simulate", "strategy.name=flora", "strategy.options.rank=16", "adapter.r=8"], ["strategy.options.rank", "adapter.r"]),
    ("bad-strategy-option", ["simulate", "strategy.name=fedavg", "strategy.options.server_lr=2"], ["strategy.options.server_lr"]),
    ("fork-on-cuda", ["simulate", "simulate.start=fork", "train.device=cuda"], ["simulate.start", "train.device"]),
    (
        "dead-before-heartbeat",
        ["coordinator", "--listen", "127.0.0.1:0", "transport.heartbeat_s=5", "transport.dead_after_s=2"],
        ["transport.dead_after_s", "transport.heartbeat_s"],
    ),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_incompatible_settings_exit_2_at_load(tmp_path: Path, procs, args: list[str], needles: list[str]) -> None:
    run = tmp_path / "run"
    rc, p = procs.run(*args, f"run_dir={run}", timeout=60, cwd=tmp_path)
    err = p.stderr
    assert rc == 2, f"exit {rc}, expected 2:\n{err}"
    for needle in needles:
        assert needle in err, f"stderr does not name {needle!r}:\n{err}"
    assert_no_traceback(err + p.stdout)
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert p.elapsed() < 30, f"took {p.elapsed():.1f}s to reject the config"
    assert not run.exists(), "a run directory was created for a rejected config"
    assert p.children_seen() == []


def test_torchrun_launcher_refuses_a_codec_at_load(tmp_path: Path) -> None:
    """The torchrun launcher all-reduces whatever sync.name says, so it refuses codecs too."""
    run = tmp_path / "run"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.torchrun_allreduce", "codec.up=int8", f"run_dir={run}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert "codec.up" in p.stderr and "torchrun" in p.stderr, p.stderr
    assert_no_traceback(p.stderr + p.stdout)
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize(
    "args,needle",
    [
        (["simulate", "train.device=cuda"], "train.device"),
        (["simulate", "aggregation=allreduce", "train.device=cuda:0"], "train.device"),
    ],
    ids=["simulate", "allreduce"],
)
def test_a_gpu_that_is_not_there_exits_2_before_workers_start(tmp_path: Path, procs, args: list[str], needle: str) -> None:
    """Devices are resolved by the launcher of local workers before any of them starts."""
    run = tmp_path / "run"
    rc, p = procs.run(*args, f"run_dir={run}", timeout=60, cwd=tmp_path)
    assert rc == 2, p.stderr
    assert needle in p.stderr and "no CUDA GPU" in p.stderr, p.stderr
    assert_no_traceback(p.stderr + p.stdout)
    assert p.children_seen() == []


def test_worker_device_flag_is_checked_before_dialling(tmp_path: Path, procs) -> None:
    rc, p = procs.run("worker", "--coordinator", "127.0.0.1:1", "--device", "gpu", timeout=60, cwd=tmp_path)
    assert rc == 2 and "--device" in p.stderr, p.stderr
    assert_no_traceback(p.stderr + p.stdout)
