"""Run a coordinator (gRPC) in this process, optionally with local worker processes (simulate)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig, dump_config
from dpeft.coordinator.engine import RoundEngine
from dpeft.coordinator.global_model import GlobalModel
from dpeft.errors import DpeftError
from dpeft.workers.runtime import set_threads

log = logging.getLogger("dpeft.launch")

class WorkerProcesses:
    """Local worker processes that this coordinator started and must clean up."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, address: str, count: int, threads: int, run_dir: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cmd = [sys.executable, "-m", "dpeft.launch.cli", "worker", "--coordinator", address, "--worker-id", f"sim-{i}", "--threads", str(threads), "--patience", "20", "--exit-with-parent"]
            out = open(logs / f"worker-{i}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
            out.close()

    def failed(self) -> str | None:
        """A message when a worker exited abnormally before being asked to stop."""
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc not in (None, 0):
                return f"worker process sim-{i} (pid {p.pid}) exited with code {rc}; see logs/worker-{i}.log"
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait for workers to leave, then SIGTERM, then SIGKILL; reap all."""
        deadline = time.time() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_coordinator(cfg: RunConfig, listen: str, local_workers: int = 0, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """Serve rounds until done; with ``local_workers`` > 0 this is `dpeft simulate`."""
    from dpeft.transport.grpc_server import GrpcCoordinatorTransport

    set_threads(cfg.simulate.coordinator_threads)
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    gm = GlobalModel(cfg)
    engine = RoundEngine(cfg, gm, run_dir, resume=resume)
    transport = GrpcCoordinatorTransport(
        listen,
        run_id=secrets.token_hex(6),
        config_yaml=dump_config(cfg),
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
        chunk_bytes=cfg.transport.chunk_bytes,
        max_update_bytes=cfg.transport.max_update_bytes,
        poll_timeout_s=cfg.transport.poll_timeout_s,
    )
    address = transport.start()
    print(f"dpeft coordinator listening on {address}; run directory {run_dir}", file=sys.stderr, flush=True)
    workers = WorkerProcesses()
    failure: list[str] = []
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()
        engine.stop_event.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def watchdog() -> None:
        while not engine.stop_event.is_set():
            msg = workers.failed()
            if msg:
                failure.append(msg)
                engine.stop_event.set()
                return
            time.sleep(0.5)

    try:
        if local_workers:
            workers.start(address, local_workers, cfg.simulate.threads_per_process, run_dir)
            threading.Thread(target=watchdog, daemon=True).start()
        rows = engine.run(transport)
    finally:
        transport.shutdown("run complete" if not (failure or interrupted.is_set()) else "coordinator stopping", grace_s=5.0)
        engine.stop_event.set()
        workers.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if failure:
        raise DpeftError(failure[0])
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not quiet:
        engine.metrics.progress_done()
        print("\n" + engine.metrics.summary(), file=sys.stderr)
        plots = engine.metrics.plot()
        final = [r for r in rows if r.get("eval_accuracy") is not None]
        acc = f"final eval accuracy {final[-1]['eval_accuracy']:.4f}; " if final else ""
        print(
            f"\n{acc}{len(rows) - 1} rounds in {time.time() - t_start:.1f}s; adapter: {run_dir / 'adapter'}; "
            f"metrics: {run_dir / 'metrics.jsonl'}; plots: {', '.join(p.name for p in plots)}",
            file=sys.stderr,
        )
    return rows
