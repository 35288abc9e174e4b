"""Graceful SIGTERM, real processes: a worker leaves cleanly (exit 0, its task re-queued at
once); the coordinator stops serving, tells the workers to stop (they exit 0) and exits 130."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from edge_testlib import free_port, tiny_overrides
from test_crash_resume import Admin, _Proc, _until, wait_listening

pytestmark = pytest.mark.integration


def test_sigterm_worker_then_coordinator(tiny_model: Path, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    args = ["coordinator", "--listen", listen, *tiny_overrides(tiny_model, tmp_path / "run", rounds=50, train__local_steps=300, transport__heartbeat_s=0.5)]
    procs: list[_Proc] = []

    def worker(w: str) -> _Proc:
        p = _Proc(["worker", "--coordinator", listen, "--worker-id", w, "--threads", "1", "--patience", "60"], tmp_path / f"{w}.log")
        procs.append(p)
        return p

    try:
        coord = _Proc(args, tmp_path / "coordinator.log")
        procs.append(coord)
        wait_listening(coord, procs)
        admin = Admin(listen)
        w0 = worker("w0")
        _until(admin.busy("w0"), 180, "w0 to hold a task", procs)
        w0.p.send_signal(signal.SIGTERM)
        assert w0.wait(90) == 0, w0.text()[-2000:]
        assert "stopped by SIGTERM" in w0.text()
        _until(lambda: "event=worker_left worker=w0 requeued=1" in coord.text(), 10, "w0's goodbye", procs)

        w1 = worker("w1")
        _until(admin.busy("w1"), 180, "w1 to hold a task", procs)
        admin.close()
        t0 = time.time()
        coord.p.send_signal(signal.SIGTERM)
        assert coord.wait(60) == 130, coord.text()[-2000:]
        assert w1.wait(90) == 0, w1.text()[-2000:]
        assert time.time() - t0 < 30
        text = coord.text()
        assert 'event=shutdown reason="coordinator stopping"' in text and "event=worker_left worker=w1" in text
        assert "Traceback" not in text + w0.text() + w1.text()
    finally:
        for p in procs:
            p.kill()
