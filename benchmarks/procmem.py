"""Memory of a process tree: PSS summed over a process and all its descendants, sampled.

PSS (proportional set size) splits shared pages among the processes sharing them, so summing
it over a tree counts each page once; RSS would count a shared library or a forked model once
per process. ``PssSampler`` samples every ``interval_s`` in a thread and keeps the peak.
"""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(sum of PSS in bytes, number of processes, largest USS of a descendant) of ``pid``'s tree now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    total, n, child_uss = 0, 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += info.pss
        n += 1
        if p.pid != pid:
            child_uss = max(child_uss, info.uss)
    return total, n, child_uss


class PssSampler:
    """Samples ``tree_memory(pid)`` every ``interval_s`` until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.peak_procs = 0
        self.peak_child_uss = 0  # the largest USS any descendant (a worker) reached
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.time()
        while not self._stop.is_set():
            total, n, child_uss = tree_memory(self.pid)
            self.peak_child_uss = max(self.peak_child_uss, child_uss)
            if total:
                self.samples.append((time.time() - t0, total, n))
                if total > self.peak:
                    self.peak, self.peak_procs = total, n
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 7200, cwd: str | None = None, interval_s: float = 0.5
) -> tuple[subprocess.CompletedProcess, float, PssSampler]:
    """Run ``cmd`` to completion while sampling its tree's PSS; returns (result, wall seconds, sampler)."""
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=cwd
    )
    with PssSampler(proc.pid, interval_s) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    wall = time.time() - t0
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, sampler
