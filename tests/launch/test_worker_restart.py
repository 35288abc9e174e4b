"""`dpeft simulate` survives its workers: a worker killed mid-round is restarted, its tasks go to
the others at once, and the run ends with the adapter an uninterrupted run gives; a worker that
keeps dying ends the run with a clear message; SIGTERM mid-training stops everything in seconds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from integration_testlib import SHORT, Started, assert_no_traceback, overrides, read_metrics

pytestmark = pytest.mark.integration

# tasks of a couple of seconds each, so a signal sent after round 0 lands mid-task
#: fixed threads per step (simulate.work_conserving off): the restarted run is compared with the
#: uninterrupted one to 1e-6, and a work-conserving step's thread count follows the schedule
RUN = dict(rounds=1, clients=4, clients_per_round=4, train__local_steps=40, data__max_train_examples=200, data__test_examples=32, simulate__work_conserving=False, **SHORT)


def _worker_procs(p: Started, worker_id: str) -> list[psutil.Process]:
    """Live processes of simulate worker ``worker_id`` (forked: named dpeft-sim-N; spawned: its command line)."""
    out = []
    try:
        children = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for c in children:
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
            if c.name() == f"dpeft-{worker_id}" or worker_id in c.cmdline():
                out.append(c)
        except psutil.Error:
            pass
    return out


def _final_adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(sorted((run / "checkpoints").glob("round-*.safetensors"))[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final adapter of an uninterrupted run."""
    from integration_testlib import Procs

    run = tmp_path_factory.mktemp("reference") / "run"
    registry = Procs()
    try:
        rc, p = registry.run("simulate", *overrides(run, **RUN), timeout=300)
        assert rc == 0, p.stderr
    finally:
        for s in registry.started:
            s.kill_tree()
    return _final_adapter(run)


def test_worker_killed_mid_round_is_restarted_and_the_run_ends_the_same(tmp_path: Path, procs, reference) -> None:
    # forked workers (the default on Linux); a spawned worker is restarted by the same supervisor
    # code (launch/local_workers.py), and tests/edge/test_chaos.py kills spawned `dpeft worker`s
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, simulate__start="fork", **RUN))
    p.wait_for_line(r"^round 0/1\b", timeout=240)
    time.sleep(1.5)  # round 1's tasks are in training
    victims = _worker_procs(p, "sim-1")
    assert len(victims) == 1, p.cmdlines
    victims[0].send_signal(signal.SIGKILL)
    rc = p.wait(timeout=300)
    err = p.stderr
    assert rc == 0, f"exit {rc}:\n{err}"
    assert_no_traceback(err)
    assert f"worker process sim-1 (pid {victims[0].pid}) killed by SIGKILL" in err and "restarting it" in err, err
    assert "killed by SIGKILL" in (run / "logs" / "worker-1.log").read_text()
    assert [r["round"] for r in read_metrics(run)] == [0, 1]
    assert p.alive_descendants() == []
    final = _final_adapter(run)
    assert final.keys() == reference.keys()
    for k in final:
        assert (final[k].double() - reference[k].double()).abs().max().item() <= 1e-6, k


def test_a_worker_that_keeps_dying_ends_the_run(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, **dict(RUN, rounds=30)))
    p.wait_for_line(r"^round 0/30\b", timeout=240)
    deadline = time.monotonic() + 180
    while p.popen.poll() is None and time.monotonic() < deadline:
        for victim in _worker_procs(p, "sim-0"):  # the worker, and each replacement as soon as it appears
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        time.sleep(0.1)
    rc = p.wait(timeout=30)
    err = p.stderr
    assert rc == 1, f"exit {rc}:\n{err}"
    assert_no_traceback(err)
    assert "worker process sim-0" in err and "3 times in a row" in err and "logs/worker-0.log" in err, err
    assert err.count("restarting it") == 2, err
    assert p.alive_descendants() == []


def test_sigterm_mid_training_leaves_no_process_within_seconds(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, **dict(RUN, rounds=5, train__local_steps=400)))
    p.wait_for_line(r"^round 0/5\b", timeout=240)
    time.sleep(2.0)  # both workers are a few steps into tasks of 400 steps
    workers = p.workers_seen()
    assert len(workers) == 2, p.cmdlines
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    while (p.popen.poll() is None or p.alive_descendants()) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert p.wait(timeout=5) == 130, p.stderr
    assert p.alive_descendants() == []
    assert took <= 7.0, f"{took:.1f} s from SIGTERM to no process"  # workers get 5 s; the machine is noisy
    for i in range(2):
        assert "stopped by SIGTERM" in (run / "logs" / f"worker-{i}.log").read_text()
