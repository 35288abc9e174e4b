"""torch.distributed all-reduce aggregation: 2 real gloo processes vs the coordinator's FedAvg."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from cluster_testlib import free_port, gloo_rank, make_updates, tiny

from dpeft.codec import decode_state
from dpeft.config import StrategyConfig
from dpeft.state import max_abs_diff
from dpeft.strategies import make_strategy
from dpeft.strategies.aggregate import StreamingWeightedMean


def _fedavg(updates, template):
    agg = StreamingWeightedMean(template)
    for u in updates:
        agg.add(u)
    return agg.result()


def test_gloo_allreduce_equals_streaming_fedavg(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(gloo_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = {p.stem: decode_state(p.read_bytes()) for p in tmp_path.glob("*.bin")}
    template, updates = make_updates(6)
    want = _fedavg(updates, template)
    assert max_abs_diff(got["even"], want) <= 1e-6
    assert max_abs_diff(got["buckets"], want) <= 1e-6
    assert max_abs_diff(got["uneven"], _fedavg(updates[:5], template)) <= 1e-6
    for name, options in (("fedadam", {}), ("fedavg", {"clip_norm": 20.0})):
        strategy = make_strategy(StrategyConfig(name=name, options=options, server_lr=0.5))
        glob = template.clone()
        for _ in range(2):
            agg = strategy.begin_round(glob)
            for u in updates:
                agg.add(u)
            glob = strategy.finish_round(glob, agg)
        assert max_abs_diff(got[f"strategy_{name}"], glob) <= 1e-6, name
    # the updates really differ, so a silent no-op reduce would fail
    assert max_abs_diff(_fedavg(updates[::2], template), want) > 1e-2


def test_single_process_group_is_identity(tmp_path):
    """World size 1 (a plain `python -m ...` without torchrun) reduces to the local mean."""
    import torch.distributed as dist

    from dpeft.rounds import allreduce as rar
    from dpeft.transport import distributed_allreduce as ar

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    try:
        ar.init_group("gloo")
        template, updates = make_updates(3)
        assert max_abs_diff(rar.allreduce_fedavg(updates, template), _fedavg(updates, template)) <= 1e-12
        assert ar.ring_bytes_per_rank(1000, 1) == 0 and ar.ring_bytes_per_rank(1000, 4) == 1500
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            os.environ.pop(k, None)


def test_refuses_strategies_that_need_every_client(tmp_path):
    from dpeft.errors import ConfigError
    from dpeft.rounds.allreduce import check_strategy

    template, _ = make_updates(1)
    check_strategy(make_strategy(StrategyConfig(name="fedprox")), template)
    with pytest.raises(ConfigError, match="strategy.name"):
        check_strategy(make_strategy(StrategyConfig(name="median")), template)


@pytest.mark.integration
def test_torchrun_allreduce_run_matches_grpc_simulate(simulate_reference, tmp_path):
    """`torchrun --nproc-per-node 2 -m dpeft_launch.torchrun_allreduce`: same global adapter as simulate."""
    from dpeft.rounds.checkpoint import latest_checkpoint

    _sim_dir, (sim_round, sim_global, _, _) = simulate_reference
    run_dir = tmp_path / "ar"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "dpeft_launch.torchrun_allreduce", "--backend", "gloo", "--threads", "1", *tiny(run_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found[0] == sim_round
    assert max_abs_diff(found[1], sim_global) <= 1e-6
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    rows = [__import__("json").loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2 and rows[1]["world_size"] == 2
    assert torch.isfinite(torch.tensor(rows[1]["eval_loss"]))


@pytest.mark.integration
def test_simulate_sync_allreduce_matches_grpc_simulate(simulate_reference, tmp_path):
    """`dpeft simulate aggregation=allreduce` starts a local gloo group: same global adapter as gRPC simulate."""
    from dpeft.rounds.checkpoint import latest_checkpoint

    _sim_dir, (sim_round, sim_global, _, _) = simulate_reference
    run_dir = tmp_path / "sim-ar"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", *tiny(run_dir), "aggregation=allreduce", "simulate.dropout=0.1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stderr and "simulate.dropout is ignored" in proc.stderr
    found = latest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found[0] == sim_round
    assert max_abs_diff(found[1], sim_global) <= 1e-6
    rows = [__import__("json").loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["transport"] == "allreduce" and rows[-1]["world_size"] == 2
    assert (run_dir / "logs" / "rank-1.log").exists()


def test_coordinator_refuses_allreduce_aggregation(tmp_path):
    """There is no coordinator in the all-reduce data path: `dpeft coordinator` exits 2 naming the key."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "coordinator", "--listen", "127.0.0.1:0", f"run_dir={tmp_path}", "aggregation=allreduce"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "aggregation" in proc.stderr and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
