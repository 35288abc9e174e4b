"""SIGTERM or Ctrl-C while a payload streams: the transfer ends, then the worker leaves.

grpcio keeps a streaming call's state under Python-level locks; an exception raised by the
signal handler inside one can leave a lock taken, and grpcio's channel close (in Leave) then
waits for good. The connection below stands in for that: it holds a lock while it moves a
payload and needs it again in ``leave``; a SIGTERM raised inside the transfer would make
``leave`` fail to take it. The signal is real; only the connection is a stand-in (the timing
cannot be caused on purpose with a real one).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from dpeft.config.parse import config_to_dict
from dpeft.train import TrainingStopped
from dpeft.transport.base import TrainTask, WorkerRegistration
from dpeft.validate import load_config
from dpeft_workers.loop import serve_until_terminated


class _Conn:
    task_kinds: tuple[str, ...] = ()

    def __init__(self, cfg_tree: dict, term_in: str, signum: int) -> None:
        self.cfg_tree, self.term_in, self.signum = cfg_tree, term_in, signum
        self.lock = threading.Lock()  # held while a payload moves, as grpcio holds a call's state
        self.tasks = [TrainTask("t1", 1, 0, "b", 0, b"")]
        self.done: list[str] = []
        self.left = False

    def join(self, worker_id: str, own_examples: int | None) -> WorkerRegistration:
        return WorkerRegistration("run", "s", self.cfg_tree, [], 5.0)

    def poll_many(self, max_tasks: int) -> list[TrainTask] | float | str:
        out, self.tasks = self.tasks, []
        return out or "done"

    def _transfer(self, what: str) -> None:
        self.lock.acquire()  # taken and given back by separate steps, as in grpcio's call state
        if self.term_in == what:
            os.kill(os.getpid(), self.signum)
        for _ in range(5):  # chunks: the handler runs during one of these waits
            time.sleep(0.01)
        self.lock.release()
        self.done.append(what)

    def fetch(self, task: TrainTask) -> bytes:
        self._transfer("fetch")
        return b"payload"

    def push(self, task: TrainTask, payload: bytes, num_examples: int, metrics: dict[str, float]) -> tuple[bool, str]:
        self._transfer("push")
        return True, ""

    def leave(self) -> None:
        assert self.lock.acquire(timeout=2), "a transfer was cut short with its lock held"
        self.lock.release()
        self.left = True


class _Runtime:
    lockstep_clients = 1

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.trained = 0

    def train_tasks(self, items, should_stop=None):
        if should_stop is not None and should_stop():  # the training loop's check before a step
            raise TrainingStopped
        self.trained += len(items)
        return [(b"u", 5, {}) for _ in items]


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a process of its own
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("term_in", ["fetch", "push"])
def test_a_stop_during_a_transfer_lets_it_end_then_leaves(term_in: str, signum: int, tmp_path, capsys, handlers_restored) -> None:
    cfg = load_config(None, ["clients=2", "clients_per_round=2", f"run_dir={tmp_path}"])
    conn, rt = _Conn(config_to_dict(cfg), term_in, signum), _Runtime(cfg)
    if signum == signal.SIGTERM:
        assert serve_until_terminated(conn, "w0", runtime=rt) == 0  # type: ignore[arg-type]
        assert "stopped by SIGTERM" in capsys.readouterr().err
    else:  # Ctrl-C: the same clean leave, then KeyboardInterrupt for the caller (exit 130)
        with pytest.raises(KeyboardInterrupt):
            serve_until_terminated(conn, "w0", runtime=rt)  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert conn.left
    if term_in == "fetch":  # the download ended; the task was not trained (it goes back at Leave)
        assert conn.done == ["fetch"] and rt.trained == 0
    else:  # the update reached the coordinator whole before the worker left
        assert conn.done == ["fetch", "push"] and rt.trained == 1
