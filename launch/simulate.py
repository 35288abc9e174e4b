"""`dpeft simulate` and `dpeft coordinator`: a gRPC coordinator in this process, with local
worker processes for simulate (:mod:`dpeft_launch.local_workers`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from dpeft.config import AuthConfig, RunConfig, dump_config
from dpeft.errors import DpeftError
from dpeft.rounds.global_model import GlobalModel
from dpeft.rounds.plots import prewarm as prewarm_plots
from dpeft.sync.base import check_coordinated
from dpeft.train.cores import CoreBudget, budgeted_evaluation, usable_cpus
from dpeft_coordinator.engine import RoundEngine
from dpeft_launch.local_workers import WorkerProcesses, start_method
from dpeft_launch.worker_devices import check_worker_devices, worker_device_specs
from dpeft_workers.runtime import set_mmap_threshold, set_threads

log = logging.getLogger("dpeft.launch")

#: seconds workers get to leave when the run stops early (signal, failure) before they are killed
STOP_GRACE_S = 5.0


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """The coordinator's allocator: blocks of ``threshold`` bytes and more get their own mmap.

    It allocates one buffer per gRPC chunk; with glibc's default (a dynamic threshold that grows
    to 32 MiB) freed chunk buffers stay cached in per-thread arenas, a few hundred MiB that do not
    go back to the system. With this, coordinator memory above the global adapter and the
    aggregate stays a small multiple of the chunk size (``benchmarks/large_adapter.py``)."""
    return set_mmap_threshold(threshold)


def core_budget(cfg: RunConfig, run_dir: Path, local_workers: int) -> Path | None:
    """With ``simulate.work_conserving`` and local workers: a fresh core budget file (one slot per
    worker plus the coordinator's evaluation) of ``simulate.cores`` cores; None otherwise."""
    if not (local_workers and cfg.simulate.work_conserving):
        return None
    sim = cfg.simulate
    cores = sim.cores or min(local_workers * sim.threads_per_process, usable_cpus())
    path = run_dir / "cores.budget"
    CoreBudget.create(path, cores, local_workers + 1)
    log.info("work-conserving simulation: %d worker processes and the evaluation share %d cores", local_workers, cores)
    return path


def edge_security(cfg: RunConfig, listen: str) -> tuple[Any, Any]:
    """(server TLS credentials or None, TokenStore or None) from ``auth.*`` (``transport.*`` limits are checked at load)."""
    from dpeft.errors import ConfigError
    from dpeft.transport.auth import TokenStore
    from dpeft.transport.tls import server_credentials

    credentials = server_credentials(cfg.auth.tls_cert, cfg.auth.tls_key, cfg.auth.tls_client_ca)
    tokens = None
    if cfg.auth.tokens_file:
        if not Path(cfg.auth.tokens_file).is_file():
            raise ConfigError("auth.tokens_file", f"no such file: {cfg.auth.tokens_file}")
        tokens = TokenStore(cfg.auth.tokens_file)
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        if tokens is None:
            log.warning("listening on %s without auth.tokens_file: any client can join, push updates and read the run config", listen)
        if credentials is None:
            log.warning("listening on %s without TLS (auth.tls_cert/auth.tls_key): tokens and adapters travel in clear text", listen)
    return credentials, tokens


def run_coordinator(cfg: RunConfig, listen: str, local_workers: int = 0, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """Serve rounds until done; with ``local_workers`` > 0 this is `dpeft simulate`. The metrics rows."""
    return serve_rounds(cfg, listen, local_workers, resume, quiet).rows


class Served(NamedTuple):
    """What a finished coordinator leaves: the metrics rows and its round engine (global state, resume point)."""

    rows: list[dict[str, Any]]
    engine: RoundEngine


def serve_rounds(cfg: RunConfig, listen: str, local_workers: int = 0, resume: bool = True, quiet: bool = False) -> Served:
    """:func:`run_coordinator`, returning the engine with the rows.

    SIGINT and SIGTERM (in the main thread) stop the run: the workers are told to leave and
    terminated, the gRPC server stops, and KeyboardInterrupt is raised."""
    from dpeft.transport.events import log_event
    from dpeft.transport.grpc import GrpcCoordinatorTransport

    check_coordinated(cfg)
    devices = worker_device_specs(cfg, local_workers) if local_workers else []
    forking = bool(local_workers) and start_method(cfg, local_workers) == "fork"
    if local_workers:  # a missing GPU: one config error now, not workers dying later (forking: none is CUDA)
        check_worker_devices(devices)
    # forked workers: the coordinator loads the model with one torch thread (OpenMP's pool does
    # not survive a fork) and sets its own threads and allocator after forking
    set_threads(1 if forking else cfg.simulate.coordinator_threads)
    if not forking:
        return_large_frees()
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    credentials, tokens = edge_security(cfg, listen)
    gm = GlobalModel(cfg)
    budget = core_budget(cfg, run_dir, local_workers)
    workers = WorkerProcesses(run_dir, cfg.simulate.threads_per_process, devices, cores=budget)
    if forking:
        from dpeft_workers.runtime import WorkerRuntime

        workers.fork(WorkerRuntime(cfg, bundle=gm.bundle, run_data=gm.run_data), local_workers)
        set_threads(cfg.simulate.coordinator_threads)
        return_large_frees()
    try:
        engine = RoundEngine(cfg, gm, run_dir, resume=resume)
    except BaseException:
        workers.stop(grace_s=5.0)
        raise
    if budget is not None:  # the coordinator's evaluation takes its share of the cores too (the last slot, first served)
        engine.evaluate = budgeted_evaluation(gm.evaluate, gm.bundle.model, CoreBudget(budget, local_workers, priority=1))
    if engine.resumed_from is not None:
        log_event("resumed", round=engine.resumed_from, run_dir=run_dir)
    registry = run_dir / "workers.json"
    if not resume:
        registry.unlink(missing_ok=True)
    worker_yaml = dump_config(dataclasses.replace(cfg, auth=AuthConfig()))  # workers never see key/token paths
    transport = GrpcCoordinatorTransport(
        listen,
        cfg.transport,
        run_id=hashlib.sha256(worker_yaml.encode()).hexdigest()[:12],  # the same run after a restart
        config_yaml=worker_yaml,
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
        tokens=tokens,
        credentials=credentials,
        registry_path=registry,
        total_rounds=cfg.rounds,
    )
    try:
        address = transport.start()
    except BaseException:
        workers.stop(grace_s=5.0)
        raise
    failure: list[str] = []
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()
        engine.stop_event.set()

    # before the `listening` line: whoever reads it may signal at once
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    scheme = "TLS" if credentials is not None else "plaintext"
    auth = f"{len(tokens)} worker tokens" if tokens is not None else "no authentication"
    print(f"dpeft coordinator listening on {address} ({scheme}, {auth}); run directory {run_dir}", file=sys.stderr, flush=True)

    run_over = threading.Event()

    def tasks_done(worker_id: str) -> int:
        return int(transport.workers().get(worker_id, {}).get("tasks_done", 0))

    def supervise() -> None:
        """Restart local workers that die; end the run when one keeps dying."""
        while not run_over.wait(0.2):
            msg = workers.restart_dead(tasks_done, transport.worker_gone)
            if msg:
                failure.append(msg)
                engine.stop_event.set()
                return

    try:
        if forking:
            workers.connect(address)
        elif local_workers:
            workers.start(address, local_workers)
        if local_workers:
            threading.Thread(target=supervise, daemon=True, name="dpeft-supervise").start()
        if not quiet:
            prewarm_plots()  # after the fork: the summary's plots then cost only their drawing
        rows = engine.run(transport)
    except BaseException:
        failure.append("")  # whatever it was propagates; the workers are stopped on the way out
        raise
    finally:
        run_over.set()
        stopping = bool(failure) or interrupted.is_set()
        if stopping:  # local workers stop between training steps: they leave, or are killed after 5 s
            deadline = time.monotonic() + STOP_GRACE_S
            workers.terminate()
            transport.shutdown("coordinator stopping", grace_s=STOP_GRACE_S)
            engine.stop_event.set()
            workers.stop(grace_s=max(0.0, deadline - time.monotonic()), term_grace_s=0.5)
        else:
            transport.shutdown("run complete", grace_s=STOP_GRACE_S)
            engine.stop_event.set()
            workers.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if failure:
        raise DpeftError(failure[0])  # the supervisor's: a worker kept dying
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not quiet:
        engine.metrics.print_summary(rows, t_start)
    return Served(rows, engine)
