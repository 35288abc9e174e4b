"""Run a coordinator (gRPC) in this process, optionally with local worker processes (simulate)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dpeft.config import AuthConfig, RunConfig, dump_config
from dpeft.coordinator.engine import RoundEngine
from dpeft.errors import DpeftError
from dpeft.rounds.global_model import GlobalModel
from dpeft.sync.base import check_coordinated
from dpeft.workers.runtime import set_mmap_threshold, set_threads

log = logging.getLogger("dpeft.launch")

def return_large_frees(threshold: int = 1 << 20) -> bool:
    """The coordinator's allocator: blocks of ``threshold`` bytes and more get their own mmap.

    It allocates one buffer per gRPC chunk; with glibc's default (a dynamic threshold that grows
    to 32 MiB) freed chunk buffers stay cached in per-thread arenas, a few hundred MiB that do not
    go back to the system. With this, coordinator memory above the global adapter and the
    aggregate stays a small multiple of the chunk size (``benchmarks/large_adapter.py``)."""
    return set_mmap_threshold(threshold)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """Give child processes ``grace_s`` to exit on their own, then SIGTERM, then SIGKILL; reap all."""
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ForkedWorker:
    """A worker process forked from this one; the ``subprocess.Popen`` calls the launcher uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the watchdog and stop() both reap

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    self.returncode = -1  # reaped elsewhere: gone, status unknown
                    return self.returncode
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return rc

    def _signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


def start_method(cfg: RunConfig) -> str:
    """``simulate.start`` resolved: fork or spawn."""
    if cfg.simulate.start == "auto":
        return "fork" if sys.platform.startswith("linux") else "spawn"
    return cfg.simulate.start


class WorkerProcesses:
    """Local worker processes that this coordinator started and must clean up.

    Two ways to start them, one worker code path (``run_worker`` over real gRPC):
    - ``start``: fresh interpreters running ``dpeft worker`` (spawn);
    - ``fork`` then ``connect``: children forked from the coordinator after it has loaded the
      base model and data, before it starts any thread. They share those pages copy-on-write
      (the frozen base is never written), so N workers cost far less than N loaded models and
      skip the imports and loading. Each child waits on a pipe for the coordinator's address.
    """

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self._pipes: list[int] = []

    def start(self, address: str, count: int, threads: int, run_dir: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cmd = [sys.executable, "-m", "dpeft.launch.cli", "worker", "--coordinator", address, "--worker-id", f"sim-{i}", "--threads", str(threads), "--patience", "20", "--exit-with-parent"]
            out = open(logs / f"worker-{i}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
            out.close()

    def fork(self, runtime: Any, count: int, threads: int, run_dir: Path) -> None:
        """Fork ``count`` workers that will serve with ``runtime`` once ``connect`` gives them the address.

        Call with no other thread running and torch at one thread (OpenMP's pool does not survive
        a fork); the children set their own thread count.
        """
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        gc.freeze()  # what exists now is shared: keep the collector from touching (and so copying) it
        for i in range(count):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child never returns from here
                os.close(write_fd)
                for fd in self._pipes:
                    os.close(fd)
                _forked_worker(runtime, read_fd, f"sim-{i}", threads, logs / f"worker-{i}.log")
            os.close(read_fd)
            self._pipes.append(write_fd)
            self.procs.append(ForkedWorker(pid))

    def connect(self, address: str) -> None:
        """Tell forked workers where the coordinator listens (they exit quietly if never told)."""
        for fd in self._pipes:
            try:
                os.write(fd, address.encode())
            except OSError:
                pass  # that child is gone; the watchdog reports it
        self.close_pipes()

    def close_pipes(self) -> None:
        for fd in self._pipes:
            os.close(fd)
        self._pipes = []

    def failed(self) -> str | None:
        """A message when a worker exited abnormally before being asked to stop."""
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc not in (None, 0):
                return f"worker process sim-{i} (pid {p.pid}) exited with code {rc}; see logs/worker-{i}.log"
        return None

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait for workers to leave, then SIGTERM, then SIGKILL; reap all."""
        self.close_pipes()  # forked workers still waiting for an address exit
        stop_processes(self.procs, grace_s)


def _name_process(name: str) -> None:
    """Linux: the name ``ps``/``top`` show (a forked worker still has the coordinator's command line)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
        except (OSError, AttributeError):
            pass


def _forked_worker(runtime: Any, read_fd: int, worker_id: str, threads: int, log_path: Path) -> None:
    """Body of a forked worker process: same loop as `dpeft worker`; ends with ``os._exit``."""
    code = 1
    try:
        _name_process(f"dpeft-{worker_id}")
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        address = b""
        while chunk := os.read(read_fd, 4096):
            address += chunk
        os.close(read_fd)
        if not address:  # the coordinator stopped before listening
            code = 0
            return
        from dpeft.launch.cli import exit_with_parent
        from dpeft.transport.grpc_worker import GrpcWorkerConnection
        from dpeft.workers.loop import serve_until_terminated

        exit_with_parent()
        conn = GrpcWorkerConnection(address.decode(), token="", patience_s=20.0)
        conn.worker_id = worker_id
        code = serve_until_terminated(conn, worker_id, threads=threads, runtime=runtime)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - the child must never return into the coordinator's stack
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


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
    """Serve rounds until done; with ``local_workers`` > 0 this is `dpeft simulate`."""
    from dpeft.transport.grpc_server import GrpcCoordinatorTransport, log_event

    check_coordinated(cfg)
    forking = bool(local_workers) and start_method(cfg) == "fork"
    # forked workers: the coordinator loads the model with one torch thread (OpenMP's pool does
    # not survive a fork) and sets its own threads and allocator after forking
    set_threads(1 if forking else cfg.simulate.coordinator_threads)
    if not forking:
        return_large_frees()
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    credentials, tokens = edge_security(cfg, listen)
    gm = GlobalModel(cfg)
    workers = WorkerProcesses()
    if forking:
        from dpeft.workers.runtime import WorkerRuntime

        workers.fork(WorkerRuntime(cfg, bundle=gm.bundle), local_workers, cfg.simulate.threads_per_process, run_dir)
        set_threads(cfg.simulate.coordinator_threads)
        return_large_frees()
    try:
        engine = RoundEngine(cfg, gm, run_dir, resume=resume)
    except BaseException:
        workers.stop(grace_s=5.0)
        raise
    if engine.resumed_from is not None:
        log_event("resumed", round=engine.resumed_from, run_dir=run_dir)
    registry = run_dir / "workers.json"
    if not resume:
        registry.unlink(missing_ok=True)
    worker_yaml = dump_config(dataclasses.replace(cfg, auth=AuthConfig()))  # workers never see key/token paths
    transport = GrpcCoordinatorTransport(
        listen,
        run_id=hashlib.sha256(worker_yaml.encode()).hexdigest()[:12],  # the same run after a restart
        config_yaml=worker_yaml,
        num_clients=cfg.clients,
        decoder_factory=engine.decoder_for,
        chunk_bytes=cfg.transport.chunk_bytes,
        max_update_bytes=cfg.transport.max_update_bytes,
        max_tensor_bytes=cfg.transport.max_tensor_bytes,
        max_update_norm=cfg.transport.max_update_norm,
        max_concurrent_uploads=cfg.transport.max_concurrent_uploads,
        poll_timeout_s=cfg.transport.poll_timeout_s,
        heartbeat_s=cfg.transport.heartbeat_s,
        dead_after_s=cfg.transport.dead_after_s,
        resume_window_s=cfg.transport.resume_window_s,
        tokens=tokens,
        credentials=credentials,
        registry_path=registry,
        total_rounds=cfg.rounds,
        max_threads=cfg.transport.server_threads,
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
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    scheme = "TLS" if credentials is not None else "plaintext"
    auth = f"{len(tokens)} worker tokens" if tokens is not None else "no authentication"
    print(f"dpeft coordinator listening on {address} ({scheme}, {auth}); run directory {run_dir}", file=sys.stderr, flush=True)

    def watchdog() -> None:
        while not engine.stop_event.is_set():
            msg = workers.failed()
            if msg:
                failure.append(msg)
                engine.stop_event.set()
                return
            time.sleep(0.5)

    try:
        if forking:
            workers.connect(address)
        elif local_workers:
            workers.start(address, local_workers, cfg.simulate.threads_per_process, run_dir)
        if local_workers:
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
        engine.metrics.print_summary(rows, t_start)
    return rows
