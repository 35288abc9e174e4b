"""Bad input to the `dpeft` command: exit 2, one line naming the key or file, no traceback, fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_testlib import assert_no_traceback

pytestmark = pytest.mark.integration

CASES = [
    # (id, arguments after `dpeft`, text stderr must contain)
    ("rounds-not-int", ["simulate", "rounds=abc"], "rounds"),
    ("unknown-key", ["simulate", "bogus.key=1"], "bogus"),
    ("too-many-per-round", ["simulate", "clients_per_round=20", "clients=10"], "clients_per_round"),
    ("missing-config", ["simulate", "--config", "missing.yaml"], "missing.yaml"),
    ("missing-data-file", ["simulate", "data.dataset=file", "data.path=/nonexistent.csv"], "/nonexistent.csv"),
    ("not-key-value", ["simulate", "rounds"], "rounds"),
    ("coordinator-bad-key", ["coordinator", "--listen", "127.0.0.1:0", "rounds=-1"], "rounds"),
    ("worker-threads", ["worker", "--coordinator", "127.0.0.1:1", "--threads", "0"], "--threads"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_key(tmp_path: Path, procs, args: list[str], needle: str) -> None:
    run = tmp_path / "run"
    extra = [f"run_dir={run}"] if args[0] in ("simulate", "coordinator") else []
    rc, p = procs.run(*args, *extra, timeout=60, cwd=tmp_path)
    err = p.stderr
    assert rc == 2, f"exit {rc}, expected 2:\n{err}"
    assert needle in err, f"stderr does not name {needle!r}:\n{err}"
    assert_no_traceback(err + p.stdout)
    lines = [line for line in err.splitlines() if line.strip()]
    # argparse errors print the usage line plus one error line; everything else one line
    assert 1 <= len(lines) <= (3 if args[0] == "frobnicate" or "usage:" in err else 1), err
    assert p.elapsed() < 30, f"took {p.elapsed():.1f}s to reject bad input"
    # rejected before any work: no run directory, no worker processes
    assert not run.exists(), "a run directory was created for a rejected config"
    assert p.children_seen() == []
