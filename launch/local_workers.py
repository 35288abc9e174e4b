"""The worker processes of `dpeft simulate`: started (forked or spawned), restarted when one dies, stopped.

Two ways to start them, one worker code path (``run_worker`` over real gRPC):

- ``start``: fresh interpreters running ``dpeft worker`` (spawn);
- ``fork`` then ``connect``: children forked from the coordinator after it has loaded the base
  model and data, before it starts any thread. They share those pages copy-on-write (the frozen
  base is never written), so N workers cost far less than N loaded models and skip the imports
  and loading. Each child waits on a pipe for the coordinator's address.

A worker that dies while the run goes on (killed, out of memory, crashed) is restarted:
``restart_dead`` says why it died on the coordinator's stderr and in the worker's log, hands its
in-flight tasks back to the queue at once, and starts a fresh ``dpeft worker`` under the same
worker id (spawned: the coordinator has threads by then, and forking a threaded gRPC process is
unsafe). Tasks are seeded per (seed, round, client), so the run ends with the same adapter. A
worker that dies ``MAX_DEATHS_IN_A_ROW`` times without finishing a task in between ends the run.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig
from dpeft.train.cores import ENV as CORES_ENV
from dpeft.train.cores import CoreBudget
from dpeft_launch.procs import describe_exit, exit_with_parent, name_process, stop_processes

#: a worker dying this many times with no finished task in between ends the run
MAX_DEATHS_IN_A_ROW = 3


class ForkedWorker:
    """A worker process forked from this one; the ``subprocess.Popen`` calls the launcher uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the supervisor and stop() both reap

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


def start_method(cfg: RunConfig, count: int | None = None) -> str:
    """``simulate.start`` resolved for ``count`` workers: fork or spawn (spawn when they train on CUDA)."""
    from dpeft_launch.worker_devices import choose_start_method, worker_device_specs

    return choose_start_method(cfg.simulate.start, worker_device_specs(cfg, count or cfg.simulate.processes))


class WorkerProcesses:
    """Local worker processes that this coordinator started, restarts, and must clean up."""

    def __init__(
        self, run_dir: Path, threads: int, devices: list[tuple[str, str]] | None = None, cores: Path | None = None
    ) -> None:
        """``devices``: (device spelling, its config key) per worker, from
        :func:`dpeft_launch.worker_devices.worker_device_specs`; None = the config's ``train.device``.
        ``cores``: the core budget file the workers share (:mod:`dpeft.train.cores`; worker ``i``
        has slot ``i``); None = each trains on ``threads`` threads."""
        self.devices = devices
        self.cores = cores
        self.procs: list[Any] = []
        self.logs = Path(run_dir) / "logs"
        self.threads = threads
        self.address = ""
        self._pipes: list[int] = []
        self._lock = threading.Lock()  # procs[i] replaced by the supervisor vs stop()
        self._closed = False
        self._deaths: list[int] = []  # per worker: deaths since it last finished a task
        self._done_before: list[int] = []  # per worker: tasks done when it was last (re)started

    def _log_path(self, i: int) -> Path:
        return self.logs / f"worker-{i}.log"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        """A fresh `dpeft worker` interpreter as worker ``sim-i`` (its output appended to its log)."""
        threads = str(self.threads)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if self.cores is not None:
            env[CORES_ENV] = f"{self.cores}:{i}"
        cmd = [sys.executable, "-m", "dpeft_launch.cli", "worker", "--coordinator", self.address, "--worker-id", f"sim-{i}",
               "--threads", threads, "--patience", "20", "--exit-with-parent", "--simulated"]  # fmt: skip
        if self.devices:
            spec, key = self.devices[i % len(self.devices)]
            cmd += ["--device", spec, "--device-slot", str(i), "--device-key", key]
        with open(self._log_path(i), "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def start(self, address: str, count: int) -> None:
        """Spawn ``count`` workers dialling ``address``."""
        self.address = address
        self.logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            self._log_path(i).write_bytes(b"")
            self.procs.append(self._spawn(i))
        self._deaths = [0] * count
        self._done_before = [0] * count

    def fork(self, runtime: Any, count: int) -> None:
        """Fork ``count`` workers that will serve with ``runtime`` once ``connect`` gives them the address.

        Call with no other thread running and torch at one thread (OpenMP's pool does not survive
        a fork); the children set their own thread count.
        """
        self.logs.mkdir(parents=True, exist_ok=True)
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
                device = (*self.devices[i % len(self.devices)], i) if self.devices else None
                cores = CoreBudget(self.cores, i) if self.cores is not None else None
                _forked_worker(runtime, read_fd, f"sim-{i}", self.threads, self._log_path(i), device, cores)
            os.close(read_fd)
            self._pipes.append(write_fd)
            self.procs.append(ForkedWorker(pid))
        self._deaths = [0] * count
        self._done_before = [0] * count

    def connect(self, address: str) -> None:
        """Tell forked workers where the coordinator listens (they exit quietly if never told)."""
        self.address = address
        for fd in self._pipes:
            try:
                os.write(fd, address.encode())
            except OSError:
                pass  # that child is gone; the supervisor restarts it
        self.close_pipes()

    def close_pipes(self) -> None:
        for fd in self._pipes:
            os.close(fd)
        self._pipes = []

    def restart_dead(self, tasks_done: Callable[[str], int], requeue: Callable[[str, str], int]) -> str | None:
        """Restart every worker that exited abnormally; a message (and no restart) when one died
        ``MAX_DEATHS_IN_A_ROW`` times without finishing a task in between.

        ``tasks_done(worker_id)``: tasks it finished so far; ``requeue(worker_id, why)``: hand its
        in-flight tasks back to the queue, returning how many."""
        with self._lock:
            for i, p in enumerate(self.procs):
                rc = p.poll()
                if self._closed or rc in (None, 0):
                    continue
                wid, how = f"sim-{i}", describe_exit(rc)
                done = tasks_done(wid)
                if done > self._done_before[i]:
                    self._deaths[i] = 0
                self._deaths[i] += 1
                requeued = requeue(wid, how)
                if self.cores is not None:  # the cores it held when it died
                    CoreBudget(self.cores, i).reset(i)
                if self._deaths[i] >= MAX_DEATHS_IN_A_ROW:
                    msg = f"worker process {wid} (pid {p.pid}) {how}, {self._deaths[i]} times in a row without finishing a task; see logs/worker-{i}.log"
                    self._note(i, msg)
                    return msg
                self._note(i, f"worker process {wid} (pid {p.pid}) {how}; {requeued} task(s) re-queued; restarting it")
                self._done_before[i] = done
                self.procs[i] = self._spawn(i)
        return None

    def _note(self, i: int, msg: str) -> None:
        """``msg`` on the coordinator's stderr and in the worker's log."""
        print(f"dpeft simulate: {msg}", file=sys.stderr, flush=True)
        try:
            with open(self._log_path(i), "a", encoding="utf-8") as fh:
                fh.write(f"dpeft simulate: {msg}\n")
        except OSError:
            pass

    def terminate(self) -> None:
        """No more restarts; SIGTERM every worker now (each stops between training steps and leaves)."""
        with self._lock:
            self._closed = True
            for p in self.procs:
                p.terminate()

    def stop(self, grace_s: float = 10.0, term_grace_s: float = 5.0) -> None:
        """No more restarts; wait ``grace_s`` for workers to leave, then SIGTERM, then SIGKILL; reap all."""
        with self._lock:
            self._closed = True
        self.close_pipes()  # forked workers still waiting for an address exit
        stop_processes(self.procs, grace_s, term_grace_s)


def _forked_worker(
    runtime: Any,
    read_fd: int,
    worker_id: str,
    threads: int,
    log_path: Path,
    device: tuple[str, str, int] | None = None,
    cores: CoreBudget | None = None,
) -> None:
    """Body of a forked worker process: same loop as `dpeft worker`; ends with ``os._exit``.

    ``device``: (spelling, config key, slot) this worker trains on (the model moves there, in
    this process, before its first task)."""
    code = 1
    try:
        if device is not None:
            spec, key, slot = device
            runtime.set_device(spec, slot, key)
        name_process(f"dpeft-{worker_id}")
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
        from dpeft.transport.grpc import GrpcWorkerConnection
        from dpeft_workers.loop import serve_until_terminated
        from dpeft_workers.simulate import simulated_worker

        exit_with_parent()
        conn = GrpcWorkerConnection(address.decode(), token="", patience_s=20.0)
        conn.worker_id = worker_id
        code = serve_until_terminated(conn, worker_id, threads=threads, runtime=runtime, wrap=simulated_worker, cores=cores)
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
