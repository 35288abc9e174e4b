"""Process-level settings of a worker: torch threads and glibc's allocator (re-exported by :mod:`dpeft_workers.runtime`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads for this process."""
    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6")
    return _LIBC


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve allocations of ``nbytes`` and more by their own mmap, unmapped on free.

    glibc's default threshold starts at 128 KiB and grows (up to 32 MiB) to the largest block
    freed, so buffers of a few MiB (gRPC chunks, activations) end up cached in the heap, where
    mixed sizes fragment it: a training worker on the default task keeps about twice its live
    activations. A fixed threshold hands large blocks back on free, at the cost of page faults
    when they are allocated again. No-op off glibc or when ``MALLOC_MMAP_THRESHOLD_`` is set
    (the user's choice wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(_libc().mallopt(-3, int(nbytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def give_back_free_memory() -> bool:
    """glibc: return the heap's free pages to the system (``malloc_trim``).

    A training step frees hundreds of MiB of activations whose sizes change with every batch's
    sequence length; glibc keeps much of that as free heap, so a worker's memory creeps up
    round after round. Trimming after each task keeps it at one task's peak. A few ms; no-op
    off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False
