"""Process helpers of the launchers: stopping children, exiting with the parent, naming a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any


def stop_processes(procs: list[Any], grace_s: float = 10.0, term_grace_s: float = 5.0) -> None:
    """Give child processes ``grace_s`` to exit on their own, then SIGTERM and ``term_grace_s``
    more, then SIGKILL; reap all. ``procs``: ``subprocess.Popen`` or anything with its
    ``wait``/``terminate``/``kill``."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    deadline = time.monotonic() + term_grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def exit_with_parent() -> None:
    """Simulation workers end when the process that started them is gone (even after SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def name_process(name: str) -> None:
    """Linux: the name ``ps``/``top`` show (a forked worker still has its parent's command line)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
        except (OSError, AttributeError):
            pass


def describe_exit(returncode: int) -> str:
    """How a child process ended, for people: 'killed by SIGKILL', 'exited with code 1'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
