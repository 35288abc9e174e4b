"""`dpeft simulate` resumed in the same run_dir: it says so, counts only its own rounds, and
keeps the run clock (``elapsed_s``) going from where the first process stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_testlib import SHORT, assert_no_traceback, overrides, read_metrics

pytestmark = pytest.mark.integration


def test_simulate_resumed_says_so_and_keeps_the_run_clock(tmp_path: Path, procs) -> None:
    run = tmp_path / "run"
    tiny = dict(SHORT, train__local_steps=2, data__max_train_examples=64, data__test_examples=32)
    rc, first = procs.run("simulate", "--fresh", *overrides(run, rounds=2, **tiny), timeout=240)
    assert rc == 0, first.stderr
    assert "resumed from" not in first.stderr and "2 rounds in" in first.stderr, first.stderr
    before = read_metrics(run)

    rc, second = procs.run("simulate", *overrides(run, rounds=3, **tiny), timeout=240)
    err = second.stderr
    assert rc == 0, err
    assert_no_traceback(err)
    assert f"resumed from round 2 of 3 in {run}" in err, err
    assert "1 round in" in err and "by this process (resumed from round 2)" in err, err
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[:3] == before  # the first process's rows are kept as they were
    assert rows[3]["elapsed_s"] > before[2]["elapsed_s"]  # the clock went on, it did not restart at zero
