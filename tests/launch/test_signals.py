"""Stopping `dpeft simulate` mid-run: SIGTERM/SIGINT end it and its workers; SIGKILL orphans die alone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from integration_testlib import SHORT, assert_no_traceback, overrides

pytestmark = pytest.mark.integration

# rounds=50 so a signal always lands mid-run; tiny rounds so "round 1" comes quickly
LONG = dict(rounds=50, train__local_steps=3, data__max_train_examples=200, data__test_examples=64, **SHORT)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_stops_everything(tmp_path: Path, procs, signum: int) -> None:
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, **LONG))
    p.wait_for_line(r"^round 1/50\b", timeout=180)
    workers = p.workers_seen()
    assert len(workers) == 2, p.cmdlines
    t0 = time.monotonic()
    os.kill(p.pid, signum)
    rc = p.wait(timeout=30)
    took = time.monotonic() - t0
    err = p.stderr
    assert rc in (130, 1), f"exit {rc} after {signal.Signals(signum).name}:\n{err}"
    assert took <= 30
    assert_no_traceback(err)
    assert "interrupted" in err
    assert _alive(p.children_seen()) == [], "children alive after the parent exited"
    # what was written is consistent: every metrics line parses, a checkpoint of a finished round
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == list(range(len(rows))) and len(rows) >= 2
    ckpts = sorted((run / "checkpoints").glob("round-*.safetensors"))
    assert ckpts and int(ckpts[-1].stem.split("-")[1]) == rows[-1]["round"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert not list((run / "checkpoints").glob(".*tmp*")), "temporary checkpoint file left behind"


def test_sigterm_while_workers_start(tmp_path: Path, procs) -> None:
    """Stopped before any round ran (workers still loading): still exits and reaps its workers."""
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, **LONG))
    p.wait_for_line(r"listening on", timeout=120)
    deadline = time.monotonic() + 20
    while len(p.workers_seen()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(p.workers_seen()) == 2, p.cmdlines
    os.kill(p.pid, signal.SIGTERM)
    rc = p.wait(timeout=30)
    assert rc in (130, 1), p.stderr
    assert_no_traceback(p.stderr)
    assert _alive(p.children_seen()) == []


def test_sigkill_parent_workers_exit_by_themselves(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    p = procs.start("simulate", *overrides(run, **LONG))
    p.wait_for_line(r"^round 1/50\b", timeout=180)
    workers = p.workers_seen()
    assert len(workers) == 2, p.cmdlines
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=10) == -signal.SIGKILL
    t_kill = time.monotonic()
    deadline = t_kill + 30
    left = _alive(workers)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _alive(workers)
    took = time.monotonic() - t_kill
    if left:
        pids = [w.pid for w in left]
        for w in left:
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"worker processes {pids} still alive 30s after their parent was SIGKILLed (killed now)")
    # they noticed the parent was gone (a 0.5 s watch), not merely gave up on an unreachable
    # coordinator (that takes the workers' --patience of 20 s)
    assert took < 10, f"workers took {took:.1f}s to exit after their parent died"
