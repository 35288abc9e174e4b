"""A core budget shared by the processes of one machine: work-conserving torch threads.

The launcher creates a small file (:meth:`CoreBudget.create`) holding a budget of cores and one
slot per participant (each worker process, plus the coordinator's evaluation). Before every
training step (and every evaluation batch) a participant calls :meth:`CoreBudget.acquire`: under
an exclusive ``flock`` it marks itself busy, computes its fair share of the budget among the busy
participants, and claims ``min(share, cores nobody else holds)``; it then runs the step on that
many torch threads. :meth:`CoreBudget.release` (end of a task) gives its cores back, and the
participants still busy take them over at their next step. So while a round drains, the processes
still training grow onto the idle cores, and the coordinator's evaluation gets its share while it
runs.

Invariant: the claims in the file never add up to more than the budget, and a participant runs a
step only on the threads it claimed. A participant whose share is not free yet (another still
holds it until its next step) waits for it; with more busy participants than cores, the first ones
(the coordinator's evaluation, then those already holding cores, then by slot) get one core each
and the others wait, so an oversubscribed machine runs at most ``budget`` threads.

The file also keeps the peak of the summed claims and each slot's largest claim and step count,
which tests and benchmarks read back (:meth:`CoreBudget.stats`).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no budget (create refuses)
    fcntl = None  # type: ignore[assignment]

_MAGIC = 0x64706566
_HEAD = struct.Struct("<6q")  # magic, budget, slots, peak of the summed claims, acquires, fields per slot
_SLOT = struct.Struct("<6q")  # want, claim, largest claim, steps, priority, pid of the holder
_FIELDS = 6
#: environment variable naming a spawned worker's budget file and slot ("PATH:SLOT")
ENV = "DPEFT_CORE_BUDGET"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fair_shares(budget: int, want: list[int], claim: list[int], priority: list[int]) -> list[int]:
    """Each slot's share of ``budget`` among the wanting slots (0 for the others).

    Ranked by priority, then slots already holding cores, then slot number; the first
    ``budget % busy`` get one core more; with more busy slots than cores, the first ``budget``
    get one each."""
    busy = sorted((j for j, w in enumerate(want) if w), key=lambda j: (-priority[j], claim[j] == 0, j))
    shares = [0] * len(want)
    if not busy:
        return shares
    base, extra = divmod(budget, len(busy))
    for rank, j in enumerate(busy):
        shares[j] = base + (1 if rank < extra else 0)
    return shares


class CoreBudget:
    """One participant's handle on a budget file (``slot``), opened lazily in the process using it."""

    def __init__(self, path: str | Path, slot: int, priority: int = 0, on_step: Callable[[int, int], None] | None = None) -> None:
        self.path = Path(path)
        self.slot = slot
        self.priority = priority
        #: called with (threads, summed claims) after each acquire (debug events)
        self.on_step = on_step
        self._fd: int | None = None
        self._pid = -1
        self.threads = 0  # what this participant claims now

    @classmethod
    def create(cls, path: str | Path, budget: int, slots: int) -> None:
        """Write an empty budget of ``budget`` cores for ``slots`` participants (replacing any)."""
        if fcntl is None:
            raise OSError("a shared core budget needs fcntl (Linux or macOS)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(_HEAD.pack(_MAGIC, max(1, budget), slots, 0, 0, _FIELDS) + _SLOT.pack(*[0] * _FIELDS) * slots)
        os.replace(tmp, path)

    @classmethod
    def from_env(cls) -> CoreBudget | None:
        """The budget a launcher handed this process through :data:`ENV` (None: none)."""
        spec = os.environ.get(ENV)
        if not spec:
            return None
        path, _, slot = spec.rpartition(":")
        return cls(path, int(slot))

    # -- the file -------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # flock is per open file: never share a forked fd
            self._fd = os.open(self.path, os.O_RDWR)
            self._pid = os.getpid()
        return self._fd

    def _read(self, fd: int) -> tuple[list[int], list[list[int]]]:
        raw = os.pread(fd, _HEAD.size, 0)
        head = list(_HEAD.unpack(raw))
        if head[0] != _MAGIC:
            raise OSError(f"{self.path} is not a core budget")
        fields = head[5] or 5  # a file written before the holder's pid was kept
        size = 8 * fields
        body = os.pread(fd, size * head[2], _HEAD.size)
        slots = [[*struct.unpack_from(f"<{fields}q", body, i * size), *[0] * (_FIELDS - fields)] for i in range(head[2])]
        return head, slots

    def _write(self, fd: int, head: list[int], slots: list[list[int]]) -> None:
        fields = head[5] or 5
        os.pwrite(fd, _HEAD.pack(*head) + b"".join(struct.pack(f"<{fields}q", *s[:fields]) for s in slots), 0)

    def _locked(self, change: Callable[[list[int], list[list[int]]], Any]) -> Any:
        fd = self._open()
        assert fcntl is not None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            head, slots = self._read(fd)
            out = change(head, slots)
            self._write(fd, head, slots)
            return out
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- participants ---------------------------------------------------------------
    def try_acquire(self) -> int:
        """Mark this slot busy and claim its share of what is free now; the cores claimed (0: wait)."""

        def change(head: list[int], slots: list[list[int]]) -> int:
            me = slots[self.slot]
            me[0], me[4], me[5] = 1, self.priority, os.getpid()
            budget = head[1]
            share = fair_shares(budget, [s[0] for s in slots], [s[1] for s in slots], [s[4] for s in slots])[self.slot]
            others = sum(s[1] for j, s in enumerate(slots) if j != self.slot)
            got = max(0, min(share, budget - others))
            me[1] = got
            if got:
                me[2] = max(me[2], got)
                me[3] += 1
                head[4] += 1
            head[3] = max(head[3], others + got)
            return got

        got = int(self._locked(change))
        self.threads = got
        return got

    def acquire(self, stopping: Callable[[], bool] | None = None) -> int:
        """Claim this slot's share (waiting until at least one core is free) and run torch on it.

        ``stopping``: asked while waiting; when true, :class:`~dpeft.train.loop.TrainingStopped`."""
        delay, waited = 0.001, 0.0
        while (got := self.try_acquire()) == 0:
            if waited > 1.0:  # a process that died holding cores (before its launcher noticed) gives them back
                self._free_the_dead()
                waited = 0.0
            if stopping is not None and stopping():
                self.release()
                from dpeft.train.loop import TrainingStopped

                raise TrainingStopped("stopped while waiting for a core")
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.02)
        if torch.get_num_threads() != got:
            torch.set_num_threads(got)
        if self.on_step is not None:
            self.on_step(got, self.stats()["claimed"])
        return got

    def release(self) -> None:
        """This slot is idle: its cores go back to the budget."""

        def change(head: list[int], slots: list[list[int]]) -> None:
            slots[self.slot][0] = slots[self.slot][1] = 0

        self._locked(change)
        self.threads = 0

    def _free_the_dead(self) -> None:
        def change(head: list[int], slots: list[list[int]]) -> None:
            for s in slots:
                if s[1] and s[5] and not _alive(s[5]):
                    s[0] = s[1] = 0

        self._locked(change)

    def reset(self, slot: int) -> None:
        """Free ``slot``'s cores (its process died holding them)."""

        def change(head: list[int], slots: list[list[int]]) -> None:
            slots[slot][0] = slots[slot][1] = 0

        self._locked(change)

    def stats(self) -> dict[str, Any]:
        """budget, claimed (summed claims now), peak (their largest sum so far), acquires, and per slot
        (largest claim, steps)."""
        head, slots = self._locked(lambda h, s: (list(h), [list(x) for x in s]))
        return {
            "budget": head[1],
            "claimed": sum(s[1] for s in slots),
            "peak": head[3],
            "acquires": head[4],
            "max_threads": [s[2] for s in slots],
            "steps": [s[3] for s in slots],
        }

    def step_hook(self, stopping: Callable[[], bool]) -> Callable[[], bool]:
        """A ``should_stop`` for the training loops that also (re)claims this slot's cores before each step."""

        def should_stop() -> bool:
            if stopping():
                return True
            self.acquire(stopping)
            return stopping()

        return should_stop

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def budgeted_evaluation(
    evaluate: Callable[[Any], dict[str, Any]], model: torch.nn.Module, budget: CoreBudget
) -> Callable[[Any], dict[str, Any]]:
    """``evaluate`` run on ``budget``'s cores: claimed before each forward of ``model`` (one batch),
    given back when the evaluation ends; the calling thread's torch threads are restored."""

    def run(state: Any) -> dict[str, Any]:
        before = torch.get_num_threads()
        handle = model.register_forward_pre_hook(lambda module, args: budget.acquire() and None)
        try:
            budget.acquire()
            return evaluate(state)
        finally:
            handle.remove()
            budget.release()
            torch.set_num_threads(before)

    return run
