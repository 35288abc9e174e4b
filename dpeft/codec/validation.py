"""Content checks of a decoded client update: finite values and an optional L2-norm bound.

The round core runs them on every accepted update; a transport that already walks an upload
(gRPC) runs them itself and hands the norm along (``TaskResult.norm``): :class:`RunningCheck`
computes them while the upload streams in, on each chunk as it arrives (still in cache, and
overlapped with the rest of the transfer), so nothing walks the stored update afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from dpeft.codec.spool import release
from dpeft.codec.tensors import Entry, StateDecoder
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState

# chunks arrive as read-only bytes; the tensors viewing them here are only read
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

#: elements per slice when an update's norm is computed (bounds the temporaries to a few MiB)
_NORM_SLICE = 1 << 20
#: values per row whose squares are summed in float32 before the rows' sums are summed in float64
_ROW = 1024


def check_update(delta: AdapterState) -> float:
    """Content checks of a decoded update: every floating value finite. Returns its global L2 norm.

    One pass, tensor by tensor in slices (float32 sums of squares of 1,024-value rows, added in
    float64: within ~1e-6 of an all-float64 sum; no full-size temporaries); a spooled update gives
    its pages back every few slices, so a pass costs a few MiB of RAM. Raises
    ``RejectedUpdate("non_finite")`` naming the first tensor with a NaN or Inf.
    """
    total = 0.0
    for name, t in delta.items():
        if t.is_floating_point() and t.numel():
            # a spooled tensor keeps at most ~8 slices of pages resident
            sq, finite = _squares(t.reshape(-1), lambda: release(delta, name))  # noqa: B023 - called at once
            if not finite:
                raise RejectedUpdate("non_finite", f"tensor {name} has NaN or Inf")
            total += sq
        release(delta, name)
    return math.sqrt(total)


def check_norm(norm: float, max_norm: float | None) -> None:
    """``RejectedUpdate("norm")`` when ``norm`` exceeds ``max_norm`` (``transport.max_update_norm``; None = no bound)."""
    if max_norm is not None and not norm <= max_norm:
        raise RejectedUpdate("norm", f"update L2 norm {norm:.6g} exceeds the bound {max_norm:g} (transport.max_update_norm)")


def _float64_squares(values: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(values, dtype=torch.float64))
    return norm * norm  # inf when it overflows (``norm ** 2`` raises OverflowError)


def _slice_squares(piece: torch.Tensor) -> float:
    """The sum of squares of one 1-D slice: the squares of each 1,024-value row summed in float32
    (float64 for float64 values; float16 and bfloat16 slices go through a float32 copy), the rows'
    sums in float64. Within ~1e-6 of an all-float64 sum (the rows are short, their sum is long)
    and several times cheaper: no float64 copy of the values. numpy's ``einsum`` runs it on the
    calling thread: a gRPC thread that opened an OpenMP team (torch) for each upload chunk would
    leave the team spinning between chunks, on a core the other end of the transfer needs. A
    slice whose rows overflow float32 (finite values near 1e18 and above) is summed in float64
    again; a NaN or Inf gives a non-finite sum either way."""
    values = piece.detach()
    if values.device.type != "cpu":  # an accelerator's own reduction (no CPU thread team to mind)
        return _float64_squares(values)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    arr = values.numpy()
    head = arr.size - arr.size % _ROW
    sq = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or a NaN shows in the sum
        if head:
            rows = arr[:head].reshape(-1, _ROW)
            sq = float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64))
        if head < arr.size:
            tail = arr[head:].astype(np.float64)
            sq += float(np.dot(tail, tail))
    if not math.isfinite(sq) and arr.dtype != np.float64:
        sq = _float64_squares(values)
    return sq


def _squares(values: torch.Tensor, every_8: Callable[[], None] | None = None) -> tuple[float, bool]:
    """The sum of squares of the 1-D ``values`` (slice by slice, :func:`_slice_squares`, calling
    ``every_8`` after every 8 slices) and whether they are all finite (looked at only when the sum
    is not)."""
    sq = 0.0
    for j, piece in enumerate(values.split(_NORM_SLICE)):
        sq += _slice_squares(piece)
        if every_8 is not None and j % 8 == 7:
            every_8()
    return sq, math.isfinite(sq) or bool(values.isfinite().all())


class RunningCheck:
    """:func:`check_update` of a payload computed piece by piece as ``decoder`` receives it.

    Installed as the decoder's ``on_data`` (it keeps no reference to the decoder); every floating
    tensor's squares are summed per piece (:func:`_slice_squares`), then across pieces in float64,
    and a piece with a NaN or Inf marks its tensor.
    Pieces may split an element anywhere (the sender picks the chunk size): the bytes of a
    split element wait for the rest. :meth:`result` gives the global L2 norm once the whole
    payload has arrived, or raises ``RejectedUpdate("non_finite")`` naming the first tensor
    (in payload order) with a NaN or Inf, as :func:`check_update` would.
    """

    def __init__(self, decoder: StateDecoder) -> None:
        self._spans: list[tuple[int, int, str, torch.dtype, int]] | None = None
        self._next = 0  # the first span not yet complete
        self._carry = bytearray()  # the start of an element split between pieces
        self._total = 0.0
        self._bad: str | None = None
        decoder.on_data = self

    def __call__(self, entries: list[Entry], offset: int, piece: memoryview) -> None:
        if self._spans is None:
            self._spans = [
                (start, end, name, dtype, torch.empty((), dtype=dtype).element_size())
                for name, dtype, _shape, start, end in entries
                if dtype.is_floating_point and end > start
            ]
        stop = offset + len(piece)
        while self._next < len(self._spans):
            start, end, name, dtype, size = self._spans[self._next]
            lo, hi = max(start, offset), min(end, stop)
            if lo >= hi:
                if end <= offset:
                    self._next += 1
                    continue
                return  # this piece ends before the span starts
            self._take(piece[lo - offset : hi - offset], name, dtype, size)
            if hi < end:
                return
            self._next += 1

    def _take(self, data: memoryview, name: str, dtype: torch.dtype, size: int) -> None:
        if self._carry:
            need = size - len(self._carry)
            self._carry += data[:need]
            data = data[need:]
            if len(self._carry) < size:
                return
            self._account(memoryview(bytes(self._carry)), name, dtype)
            self._carry.clear()
        whole = len(data) - len(data) % size
        if whole:
            self._account(data[:whole], name, dtype)
        self._carry += data[whole:]

    def _account(self, data: memoryview, name: str, dtype: torch.dtype) -> None:
        sq, finite = _squares(torch.frombuffer(data, dtype=dtype))
        if not finite and self._bad is None:
            self._bad = name
        self._total += sq

    def result(self) -> float:
        """The update's global L2 norm (``RejectedUpdate("non_finite")`` if a value was NaN or Inf)."""
        if self._bad is not None:
            raise RejectedUpdate("non_finite", f"tensor {self._bad} has NaN or Inf")
        return math.sqrt(self._total)
