"""`dpeft simulate` end to end: a real coordinator + two worker processes on loopback gRPC."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from integration_testlib import METRIC_KEYS, assert_no_traceback, compare_exported_adapter, overrides, read_metrics

pytestmark = pytest.mark.integration

# Enough local training that two rounds of two iid clients beat the untrained adapter by a
# wide margin (measured over several seeds: round-0 ~0.5, round 2 ~0.62-0.7 on 200 examples, seeds 0-3).
LEARNS = dict(train__local_steps=12, train__batch_size=16, train__lr=0.005, data__test_examples=200, model__max_length=48)


def test_simulate_end_to_end(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    rc, p = procs.run("simulate", *overrides(run, **LEARNS), timeout=240)
    err = p.stderr
    assert rc == 0, f"exit {rc}:\n{err}"
    assert_no_traceback(err)

    # -- no orphans: both worker processes were seen, and none outlived the parent
    workers = p.workers_seen()
    assert len(workers) == 2, f"expected 2 worker children, saw {p.cmdlines}"
    assert p.alive_descendants() == [], "worker processes outlived `dpeft simulate`"

    # -- metrics contract
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, f"round {r['round']} lacks {missing}"
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and math.isfinite(r["eval_loss"])
        assert r["rejected"] == 0
        assert r["wall_s"] >= 0
    assert rows[0]["clients"] == 0 and rows[0]["num_examples"] == 0 and rows[0]["train_loss"] is None
    for r in rows[1:]:
        assert r["clients"] == 2
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        # 400 training examples over 4 iid clients, 2 sampled
        assert r["num_examples"] == 200
        assert math.isfinite(r["train_loss"])
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.05, [r["eval_accuracy"] for r in rows]

    # -- run directory
    assert (run / "config.yaml").is_file()
    assert sorted(x.name for x in (run / "checkpoints").glob("round-*.safetensors"))[-1] == "round-000002.safetensors"
    for name in ("accuracy.png", "bytes.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    for i in range(2):
        assert (run / "logs" / f"worker-{i}.log").is_file()

    # -- progress and the summary table on stderr
    assert "eval acc" in err
    assert "round 2/2" in err

    # -- the exported PEFT dir is exactly the checkpointed global adapter
    conf = compare_exported_adapter(run)
    assert conf["peft_type"] == "LORA"


def test_forked_and_spawned_workers_train_the_same(tmp_path: Path, procs) -> None:
    """simulate.start=fork (workers share the coordinator's loaded model) and spawn (fresh
    `dpeft worker` interpreters) are one code path: same global adapter, same metrics."""
    from integration_testlib import SHORT
    from safetensors.torch import load_file

    finals = {}
    for start in ("fork", "spawn"):
        run = tmp_path / start
        # fixed threads per step, so the two runs can agree to 1e-6 (work conservation: fp32 rounding)
        rc, p = procs.run("simulate", *overrides(run, simulate__start=start, rounds=1, simulate__work_conserving=False, **SHORT), timeout=240)
        assert rc == 0, f"{start}: exit {rc}:\n{p.stderr}"
        assert_no_traceback(p.stderr)
        workers = p.workers_seen()
        assert len(workers) == 2, f"{start}: {p.cmdlines}"
        if start == "fork":  # forked: direct children carrying the coordinator's command line
            assert all(w.pid in p.forked_workers for w in workers)
        else:
            assert all("worker" in p.cmdlines[w.pid] for w in workers)
        assert p.alive_descendants() == []
        ckpt = sorted((run / "checkpoints").glob("round-*.safetensors"))[-1]
        finals[start] = (load_file(ckpt), [(r["eval_accuracy"], r["train_loss"], r["bytes_up"]) for r in read_metrics(run)])
    fork_t, fork_rows = finals["fork"]
    spawn_t, spawn_rows = finals["spawn"]
    assert fork_rows == spawn_rows
    assert fork_t.keys() == spawn_t.keys()
    for k in fork_t:
        assert (fork_t[k].double() - spawn_t[k].double()).abs().max().item() <= 1e-6, k
