"""`dpeft simulate` with ``sync: allreduce``: a local torch.distributed group instead of a coordinator.

Starts ``simulate.processes`` ranks of :mod:`dpeft_launch.torchrun_allreduce` on this machine
with the standard environment (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), the same thing ``torchrun
--nproc-per-node N`` does, so the one code path serves simulation, torchrun and Ray
(``dpeft ray`` with ``sync: allreduce``). Rank 0 prints progress and the summary and writes the
run directory; the other ranks log to ``run_dir/logs/rank-R.log``. When any rank fails the
others are stopped, and the launcher exits with the failing rank's code (2 for a config error).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig, dump_config
from dpeft_launch.procs import stop_processes


def free_port() -> int:
    """A TCP port on loopback that is free now (rank 0's store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    """The environment torchrun would give rank ``rank`` of a single-node group."""
    return dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )


def run_local_allreduce(cfg: RunConfig, resume: bool = True, backend: str | None = None) -> int:
    """Run every round on ``cfg.simulate.processes`` local ranks; returns the exit code."""
    from dpeft.rounds.allreduce import warn_collective_ignores
    from dpeft_launch.worker_devices import check_worker_devices, rank_backend, worker_device_specs

    warn_collective_ignores(cfg, "dpeft simulate", "aggregation=allreduce")
    world = max(1, cfg.simulate.processes)
    devices = worker_device_specs(cfg, world)
    check_worker_devices(devices)  # a missing GPU: one config error before any rank starts
    backend = backend or rank_backend(devices)
    threads = cfg.simulate.threads_per_process
    run_dir = Path(cfg.run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="dpeft-allreduce-", delete=False) as f:
        f.write(dump_config(cfg))
        config_path = f.name
    procs: list[subprocess.Popen[Any]] = []
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    port = free_port()
    try:
        for rank in range(world):
            cmd = [
                sys.executable,
                "-m",
                "dpeft_launch.torchrun_allreduce",
                "--config",
                config_path,
                "--threads",
                str(threads),
                "--exit-with-parent",
            ]
            if backend:
                cmd += ["--backend", backend]
            if cfg.simulate.devices:
                cmd += ["--device", devices[rank][0], "--device-key", devices[rank][1]]
            if not resume:
                cmd.append("--fresh")
            out = None if rank == 0 else open(logs / f"rank-{rank}.log", "wb")
            procs.append(
                subprocess.Popen(
                    cmd, env=rank_env(rank, world, port, threads), stdout=out, stderr=subprocess.STDOUT if out else None
                )
            )
            if out is not None:
                out.close()
        print(
            f"dpeft simulate: sync=allreduce, {world} ranks ({backend}) on 127.0.0.1:{port}; run directory {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        while not interrupted:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                where = "above" if rank == 0 else f"in {logs / f'rank-{rank}.log'}"
                if code != 2:  # a config error was already printed by the rank in one line
                    print(f"dpeft simulate: rank {rank} exited with code {code}; see its output {where}", file=sys.stderr)
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        raise KeyboardInterrupt
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        stop_processes(procs, grace_s=0.0)
        for s, h in old.items():
            signal.signal(s, h)
        os.unlink(config_path)
