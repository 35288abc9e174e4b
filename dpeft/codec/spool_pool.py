"""Spool files kept open for the next payload instead of closed after each one.

A coordinator spools every large upload and every large global it publishes, round after
round. A fresh temporary file gets fresh page-cache pages, and allocating those is what such a
write costs: on a virtual machine that hands freed memory back to its host (free page
reporting, balloons), writing 512 MiB into a new file measured 2.6-7 s, into a file written
before 0.08 s. So a file whose payload is done goes back to a small pool (per spool directory)
and the next payload overwrites it from the start; its pages stay cached (clean or dirty
page cache the kernel may write back and reclaim under pressure, never process memory).

A file comes back only when nothing can still read its old contents: a spooled upload's
tensors are private mappings of the file, and a page of such a mapping that was never written
shows later writes to the file, so a file is pooled only once its payload object and every
mapping made from it are gone (a :class:`Lease` counts them). The pool holds at most :data:`MAX_FILES` files and
:data:`MAX_BYTES` bytes (a quarter of physical memory); what does not fit is closed, and a
closed unlinked file gives its pages back at once. A forked child starts with an empty pool
and never pools a file it inherited. ``DPEFT_SPOOL_REUSE=0`` turns reuse off.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from typing import Any

#: files kept per process (all directories together)
MAX_FILES = 8


def _quarter_of_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 1 << 30


#: total bytes of the pooled files
MAX_BYTES = _quarter_of_memory()

# reentrant: a garbage collection that runs while a thread holds it (any allocation may start
# one) can finalize a payload in a reference cycle, whose Lease then gives its file back here
_lock = threading.RLock()
_files: list[tuple[str | None, Any, int]] = []  # (directory, file object, its size)


def enabled() -> bool:
    return os.environ.get("DPEFT_SPOOL_REUSE", "1") != "0"


def open_file(directory: str | None, prefix: str, size: int) -> Any:
    """A pooled file of ``directory`` (the smallest that holds ``size`` bytes, else the largest),
    positioned at its start, or a new unlinked temporary file."""
    with _lock:
        mine = [(n, i) for i, (d, _fh, n) in enumerate(_files) if d == directory]
        if mine:
            fits = [(n, i) for n, i in mine if n >= size]
            _, i = min(fits) if fits else max(mine)
            fh = _files.pop(i)[1]
            os.lseek(fh.fileno(), 0, os.SEEK_SET)
            return fh
    return tempfile.TemporaryFile(dir=directory, prefix=prefix, buffering=0)


def give_back(directory: str | None, fh: Any) -> None:
    """``fh``'s payload is done and nothing maps it: pool it when it fits, else close it."""
    if fh.closed:
        return
    if enabled():
        size = os.fstat(fh.fileno()).st_size
        with _lock:
            if len(_files) < MAX_FILES and sum(n for _, _, n in _files) + size <= MAX_BYTES:
                _files.append((directory, fh, size))
                return
    fh.close()


class Lease:
    """One payload's use of a spool file: the file goes back (:func:`give_back`) when its owner
    and every mapping made from it (:meth:`hold`) are gone, whichever goes last."""

    def __init__(self, owner: object, directory: str | None, fh: Any) -> None:
        self.directory, self.fh = directory, fh
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._holders = 0
        self.hold(owner)

    def hold(self, obj: object) -> None:
        with self._lock:
            self._holders += 1
        # not at interpreter exit: a payload still alive then (e.g. read by a daemon thread) keeps its file
        weakref.finalize(obj, self._drop).atexit = False

    def _drop(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last and os.getpid() == self.pid:
            give_back(self.directory, self.fh)
        elif last:  # a forked child's copy of a parent's payload: the parent may still use the file
            self.fh.close()


def _forget_in_child() -> None:
    """A forked child starts with an empty pool: its parent's pooled files stay the parent's."""
    global _lock
    _lock = threading.RLock()
    _files.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def pooled() -> list[tuple[str | None, int]]:
    """(directory, size) of the files held now (tests, diagnostics)."""
    with _lock:
        return [(d, n) for d, _, n in _files]


def clear() -> None:
    """Close every pooled file."""
    with _lock:
        held = [fh for _, fh, _ in _files]
        del _files[: len(held)]  # a file given back while this list was built stays pooled
    for fh in held:
        fh.close()
