"""The worker process main loop over any WorkerConnection: join, poll, fetch, train, push."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dpeft.config import AuthConfig, RunConfig
from dpeft.errors import PayloadGone, RejectedUpdate
from dpeft.privacy.secagg.messages import TASK_KINDS as SECAGG_KINDS
from dpeft.rounds.fedeval import EVALUATE, WORKER_TASK_KINDS
from dpeft.train import TrainingStopped
from dpeft.train.cores import CoreBudget
from dpeft.transport.base import TrainTask, WorkerConnection
from dpeft.validate import config_from_dict
from dpeft_workers.runtime import WorkerRuntime, set_threads
from dpeft_workers.secagg import run_secagg_tasks

log = logging.getLogger("dpeft.worker")

#: the task kinds besides training this worker runs (declared when it joins)
KINDS = WORKER_TASK_KINDS + SECAGG_KINDS


def run_worker(
    conn: WorkerConnection,
    worker_id: str,
    threads: int = 1,
    data_path: str | None = None,
    stop: threading.Event | None = None,
    runtime: WorkerRuntime | None = None,
    wrap: Callable[[RunConfig, WorkerConnection, WorkerRuntime], WorkerConnection] | None = None,
    busy: threading.Event | None = None,
    device: str | None = None,
    device_slot: int | None = None,
    device_key: str = "--device",
    cores: CoreBudget | None = None,
) -> int:
    """Serve tasks until the coordinator says stop (returns 0) or ``stop`` is set.

    ``runtime``: one built before joining (a worker forked by `dpeft simulate` inherits the
    coordinator's loaded model and data); used only when the coordinator's config is the one it
    was built for, otherwise the worker builds its own. ``wrap``: applied around the worker once
    the run's config is known, returning the connection to serve over (`dpeft simulate`'s
    simulated heterogeneity, :func:`dpeft_workers.simulate.simulated_worker`). ``stop`` also
    ends a task in training, between two of its steps (the task goes back to the coordinator).
    ``busy`` is set while the worker trains or moves a payload (a streamed download or upload),
    where ``stop`` is only looked at between steps and after the transfer. ``device``:
    overrides the run's ``train.device`` on this worker (``dpeft worker --device``); ``device_slot``: this process's number among a launcher's
    (a bare ``cuda``/``auto`` takes visible GPU slot mod count); ``device_key``: what a device
    error names. ``cores``: a core budget shared with the launcher's other processes
    (:mod:`dpeft.train.cores`; default: the one named by ``DPEFT_CORE_BUDGET``, else none): the
    worker trains each step on the cores it claims there and gives them back between tasks.
    """
    stop = stop or threading.Event()
    set_threads(threads)
    cores = cores if cores is not None else CoreBudget.from_env()
    conn.task_kinds = KINDS  # evaluation and secure-aggregation tasks are handed only to workers that declare them
    reg = conn.join(worker_id, own_examples=0 if data_path else None)
    try:
        cfg = config_from_dict(reg.config)
        if runtime is not None and data_path is None and dataclasses.replace(runtime.cfg, auth=AuthConfig()) == cfg:
            pass  # the prepared runtime serves this coordinator's run
        else:
            if runtime is not None:
                log.warning("worker %s: the coordinator's config differs from the prepared one; loading the model again", worker_id)
            own = None
            if data_path:
                from dpeft.data import load_client_file, load_run_data

                label_names = load_run_data(cfg).label_names if cfg.model.task == "seq_cls" or cfg.data.label_column else None
                own = load_client_file(cfg, data_path, label_names)
            runtime = WorkerRuntime(cfg, own_data=own, device=device, local_index=device_slot, device_key=device_key)
    except BaseException:
        conn.leave()  # e.g. bad data: give the client slot back instead of holding it while silent
        raise
    if wrap is not None:
        conn = wrap(cfg, conn, runtime)
    log.info("worker %s ready (clients %s)", worker_id, reg.client_ids or "virtual")
    done = 0
    remote_stop = getattr(conn, "stop_requested", None)  # set by a heartbeat reply (gRPC)

    def stopping() -> bool:
        return stop.is_set() or (remote_stop is not None and remote_stop.is_set())

    want = runtime.lockstep_clients  # train.lockstep: take several tasks of a round and train them together
    # task id -> (blob sha, update, n, metrics) of the last batch trained
    last: dict[str, tuple[bytes, bytes, int, dict[str, float]]] = {}
    try:
        while not stop.is_set():
            if remote_stop is not None and remote_stop.is_set():
                log.info("worker %s stopping: the coordinator asked", worker_id)
                break
            item = conn.poll_many(want)
            if isinstance(item, str):
                log.info("worker %s stopping: %s", worker_id, item)
                break
            if isinstance(item, float):
                if item > 0:
                    time.sleep(min(item, 1.0))
                continue
            with _flagged(busy):
                todo = _fetch_payloads(conn, item, last, stopping)
            if not todo:
                continue
            try:
                with _flagged(busy):
                    results = _run(runtime, todo, stopping, cores)
            except TrainingStopped:
                log.info("worker %s stopping: asked to while training (task %s goes back to the queue)", worker_id, todo[0][0].task_id)
                break
            last = {task.task_id: (task.blob_sha256, *result) for (task, _), result in zip(todo, results, strict=True) if result is not None}
            # let go of the payloads before the next fetch: the connection may then reuse their buffer
            tasks, todo = [task for task, _ in todo], []
            for task, result in zip(tasks, results, strict=True):
                if result is None:  # a secure-aggregation request this client refused: no reply
                    continue
                with _flagged(busy):
                    _push(conn, task, *result)
                done += 1
    finally:
        stop.set()
        conn.leave()
    return 0


def _run(
    runtime: WorkerRuntime, todo: list[tuple[TrainTask, bytes]], stopping: Callable[[], bool], cores: CoreBudget | None = None
) -> list[tuple[bytes, int, dict[str, float]]] | list[tuple[bytes, int, dict[str, float]] | None]:
    """Results of ``todo`` in order (see :func:`_run_tasks`); with ``cores``, on the cores claimed
    before each step, given back at the end."""
    if cores is None:
        return _run_tasks(runtime, todo, stopping)
    cores.acquire(stopping)
    try:
        return _run_tasks(runtime, todo, cores.step_hook(stopping))
    finally:
        cores.release()


def _run_tasks(
    runtime: WorkerRuntime, todo: list[tuple[TrainTask, bytes]], stopping: Callable[[], bool]
) -> list[tuple[bytes, int, dict[str, float]]] | list[tuple[bytes, int, dict[str, float]] | None]:
    """Results of ``todo`` in order: evaluation tasks evaluated, secure-aggregation steps run
    (None: no reply), the others trained (together where lockstep allows)."""
    if todo and todo[0][0].kind in SECAGG_KINDS:  # a batch holds tasks of one round and kind
        return run_secagg_tasks(runtime, todo, stopping)
    evals = [i for i, (t, _) in enumerate(todo) if t.kind == EVALUATE]
    if not evals:
        return runtime.train_tasks(todo, should_stop=stopping)
    results: dict[int, tuple[bytes, int, dict[str, float]]] = {}
    for i, result in zip(evals, runtime.evaluate_tasks([todo[i] for i in evals]), strict=True):
        results[i] = result
    rest = [i for i in range(len(todo)) if i not in results]
    if rest:
        for i, result in zip(rest, runtime.train_tasks([todo[i] for i in rest], should_stop=stopping), strict=True):
            results[i] = result
    return [results[i] for i in range(len(todo))]


@contextlib.contextmanager
def _flagged(flag: threading.Event | None) -> Iterator[None]:
    """``flag`` set for the duration of the block (nothing when None)."""
    if flag is None:
        yield
        return
    flag.set()
    try:
        yield
    finally:
        flag.clear()


def _fetch_payloads(
    conn: WorkerConnection,
    tasks: list[TrainTask],
    last: dict[str, tuple[bytes, bytes, int, dict[str, float]]],
    stopping: Callable[[], bool] = lambda: False,
) -> list[tuple[TrainTask, bytes]]:
    """(task, payload) of each task to train; a task re-issued with the same payload gets the
    update computed before re-sent instead. The payloads are referred to by the returned list
    only (the connection reuses a download buffer nothing else refers to). Once ``stopping``,
    no further payload is fetched (the tasks not fetched go back to the coordinator)."""
    todo: list[tuple[TrainTask, bytes]] = []
    for task in tasks:
        if stopping():
            break
        if task.kind and task.kind not in KINDS:  # a kind this worker does not know: never train instead
            log.warning("task %s has kind %r, which this worker does not run; refused (no reply)", task.task_id, task.kind)
            continue
        prev = last.get(task.task_id)
        if prev is not None and prev[0] == task.blob_sha256:
            # the same task again (a restarted coordinator re-issued it): send the result we have
            log.info("task %s re-issued; re-sending the update computed before", task.task_id)
            _push(conn, task, prev[1], prev[2], prev[3])
            continue
        try:
            todo.append((task, conn.fetch(task)))
        except PayloadGone as exc:  # its round closed meanwhile: nothing to do
            log.info("task %s dropped: %s", task.task_id, exc)
        # any other failure ends the worker loudly: a task kept without a reply would hold its
        # round until sync.round_timeout_s
    return todo


def _push(conn: WorkerConnection, task: TrainTask, update: bytes, n: int, metrics: dict[str, float]) -> None:
    ok, reason = conn.push(task, update, n, metrics)
    if not ok:  # an update for a round (or run) that closed meanwhile is routine under async/deadline
        routine = any(f"({r})" in reason for r in RejectedUpdate.ROUTINE)
        log.log(logging.INFO if routine else logging.WARNING, "update for task %s rejected: %s", task.task_id, reason)


class _WorkerStop(BaseException):
    """SIGTERM in a worker process: unwind (run_worker's finally says Leave), exit 0."""


# Why transfers are not interrupted: an exception raised by the signal handler lands at an
# arbitrary bytecode of the main thread, for example inside grpcio's Python-level
# ``Condition.__enter__`` of a streaming call, after the lock is taken and before the ``with``
# block that would release it. grpcio's channel thread then waits on that lock for good, and
# ``channel.close()`` (in Leave) waits for the channel thread: the worker said Leave, then hung
# (seen once under load in the SIGTERM test). Streamed transfers take seconds at most; the flag
# is looked at when they end.


def serve_until_terminated(conn: WorkerConnection, worker_id: str, **kwargs: Any) -> int:
    """``run_worker`` as a process's main loop (`dpeft worker`, a forked simulate worker): SIGTERM
    leaves cleanly (the coordinator re-queues the task in hand) and returns 0; Ctrl-C (SIGINT,
    where it raises KeyboardInterrupt) leaves the same way and then raises KeyboardInterrupt.

    In training and while a payload streams, the signal sets the stop flag, which the training
    loop checks between steps and the worker loop after the transfer; anywhere else (joining,
    loading, polling) it unwinds at once, and so does a second signal."""
    stop, busy = threading.Event(), threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        stop.set()
        if not busy.is_set() or len(received) > 1:
            raise _WorkerStop

    signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:  # not where SIGINT is ignored or handled by the caller
        signal.signal(signal.SIGINT, on_signal)
    try:
        run_worker(conn, worker_id, stop=stop, busy=busy, **kwargs)
    except _WorkerStop:
        pass
    finally:
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    if received:
        print(f"dpeft worker {worker_id}: stopped by SIGTERM", file=sys.stderr)
    return 0
