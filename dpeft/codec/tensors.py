"""Tensor payload format: safetensors layout (u64 header length, JSON header, raw LE data).

The writer keeps the state's tensor order and metadata. The reader is our own incremental
parser: it reads only the header first, checks it against limits and, when given, against
the expected schema (names, shapes, dtypes) *before* allocating anything, then copies the
data in as chunks arrive -- into memory, or, for payloads of at least a
:class:`~dpeft.codec.spool.SpoolPolicy` threshold, into an unlinked temporary file whose
tensors are then memory-mapped (so a multi-GiB upload costs a chunk of RAM, not its size). Nothing here ever unpickles; files written here load with
``safetensors.torch.load``.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpeft.codec.spool import SpooledState, SpoolFile, SpoolPolicy
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("dpeft's wire format assumes a little-endian host")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_META_KEY = "__metadata__"


@dataclass(frozen=True)
class Limits:
    """Bounds applied to incoming payloads before any allocation."""

    max_header_bytes: int = 16 * 1024 * 1024
    max_total_bytes: int = 1 << 34
    max_tensors: int = 1 << 16
    max_dims: int = 8


def _header(state: AdapterState) -> tuple[bytes, list[torch.Tensor]]:
    header: dict[str, Any] = {_META_KEY: {"dpeft": json.dumps(state.meta, sort_keys=True)}}
    offset = 0
    flat: list[torch.Tensor] = []
    for name, tensor in state.tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot travel")
        t = tensor.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        flat.append(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, flat


def _raw_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def iter_encoded(state: AdapterState) -> Iterator[memoryview]:
    """The encoded payload as a sequence of zero-copy pieces (header, then each tensor)."""
    head, flat = _header(state)
    yield memoryview(head)
    for t in flat:
        yield _raw_bytes(t)


def encode_state(state: AdapterState) -> bytes:
    """The whole payload as one bytes object (fine for adapters; large ones use iter_chunks)."""
    return b"".join(bytes(p) for p in iter_encoded(state))


def iter_chunks(pieces: Iterable[memoryview | bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Regroup pieces into chunks of exactly ``chunk_bytes`` (the last may be shorter)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    buf = bytearray()
    for piece in pieces:
        mv = memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
        pos = 0
        while pos < len(mv):
            take = min(chunk_bytes - len(buf), len(mv) - pos)
            buf += mv[pos : pos + take]
            pos += take
            if len(buf) == chunk_bytes:
                yield bytes(buf)
                buf = bytearray()
    if buf:
        yield bytes(buf)


def encoded_size(state: AdapterState) -> int:
    """Size in bytes of the encoded payload, without encoding the tensors."""
    head, flat = _header(state)
    return len(head) + sum(t.numel() * t.element_size() for t in flat)


Schema = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def zeroed_buffer(n: int) -> bytearray | mmap.mmap:
    """A writable zero-filled buffer of ``n`` bytes. Large ones are anonymous memory maps whose
    pages the kernel zero-fills as they are first written (``bytearray(n)`` would memset all of
    them up front, holding the GIL, before a single byte arrived)."""
    if n < 1 << 20:
        return bytearray(n)
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, n, flags=private) if private else mmap.mmap(-1, n)  # private: plain anonymous memory


#: Linux >= 5.14: fault in a range of pages for writing in one call (Python 3.13 names it)
_POPULATE_WRITE: int | None = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Any:
    """libc's ``madvise`` through ctypes (which lets go of the GIL during the call), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - not a Unix libc
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise() if _POPULATE_WRITE is not None else None


def write_into(buf: bytearray | mmap.mmap, start: int, data: bytes | memoryview) -> None:
    """``buf[start:start + len(data)] = data``, where ``buf`` may be a :func:`zeroed_buffer`.

    A large piece is copied by numpy, which lets go of the GIL for the copy (a receiving thread
    then does not hold up the rest of the process: the gRPC threads, the other end of an
    in-process transfer). Before copying into a memory map it asks the kernel to fault the
    destination pages in with one ``madvise(MADV_POPULATE_WRITE)`` (also without the GIL)
    instead of one page fault per 4 KiB page during the copy: the pages are still committed
    only as data arrives, and a fresh buffer fills about 20% faster (0.40 instead of 0.52 ms/MiB
    measured here). Kernels without it: a plain copy."""
    global _POPULATE_WRITE
    n = len(data)
    if n < 1 << 16:
        buf[start : start + n] = data
        return
    dst = np.frombuffer(buf, dtype=np.uint8, count=n, offset=start)
    if _POPULATE_WRITE is not None and isinstance(buf, mmap.mmap):
        addr = dst.ctypes.data
        first = addr - addr % _PAGE
        if _MADVISE is None or _MADVISE(first, addr + n - first, _POPULATE_WRITE) != 0:  # EINVAL before Linux 5.14
            _POPULATE_WRITE = None
    dst[...] = np.frombuffer(data, dtype=np.uint8)


#: (name, dtype, shape, start, end) of one tensor of a payload's data region
Entry = tuple[str, torch.dtype, tuple[int, ...], int, int]


class StateDecoder:
    """Incremental decoder: ``feed(chunk)`` repeatedly, then ``finish()``.

    The header is parsed and validated as soon as it is complete; tensor memory is allocated
    only after validation and only for the sizes the header declares (checked against
    ``schema`` when given, so a peer cannot make us allocate more than the adapter needs).
    """

    def __init__(self, schema: Schema | None = None, limits: Limits = Limits(), allow_subset: bool = False, spool: SpoolPolicy | None = None) -> None:
        self.schema = schema
        self.limits = limits
        self.allow_subset = allow_subset
        self.spool = spool
        self._prefix = bytearray()
        self._header_len: int | None = None
        self._entries: list[Entry] = []
        self._meta: dict[str, Any] = {}
        self._data: bytearray | None = None
        self._file: SpoolFile | None = None
        self._size = 0
        self._filled = 0
        self._borrowed: bytearray | mmap.mmap | None = None  # decode_in_place's payload
        self._base = 0  # where the data region starts in self._data
        self.received = 0
        #: called with (:attr:`entries`, offset in the data region, piece) for every piece of
        #: the data region, once it is stored (e.g. :class:`~dpeft.codec.validation.RunningCheck`)
        self.on_data: Callable[[list[Entry], int, memoryview], None] | None = None

    @property
    def entries(self) -> list[Entry]:
        """(name, dtype, shape, start, end) of every tensor, in payload order; empty until the header is parsed."""
        return self._entries

    # -- header ---------------------------------------------------------
    def _parse_header(self, raw: bytes) -> None:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, over-long ints, deep nesting
            raise ProtocolError(f"payload header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("payload header must be a JSON object")
        meta = header.pop(_META_KEY, {}) or {}
        if not isinstance(meta, dict):
            raise ProtocolError("payload metadata must be an object")
        if "dpeft" in meta:
            try:
                self._meta = json.loads(meta["dpeft"])
            except (TypeError, ValueError, RecursionError):
                raise ProtocolError("payload metadata 'dpeft' is not JSON") from None
            if not isinstance(self._meta, dict):
                raise ProtocolError("payload metadata 'dpeft' must be an object")
        if len(header) > self.limits.max_tensors:
            raise ProtocolError(f"payload declares {len(header)} tensors (limit {self.limits.max_tensors})")
        entries = []
        expected_offset = 0
        for name, spec in header.items():
            if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
                raise ProtocolError(f"tensor {name!r}: header entry must have dtype, shape, data_offsets")
            dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
            if dtype is None:
                raise ProtocolError(f"tensor {name!r}: unknown dtype {spec['dtype']!r}")
            shape = spec["shape"]
            if (
                not isinstance(shape, list)
                or len(shape) > self.limits.max_dims
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
            ):
                raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
            offs = spec["data_offsets"]
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
                raise ProtocolError(f"tensor {name!r}: bad data_offsets {offs!r}")
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if offs[0] != expected_offset or offs[1] - offs[0] != nbytes:
                raise ProtocolError(f"tensor {name!r}: data_offsets {offs} do not match shape {shape} and dtype")
            expected_offset = offs[1]
            entries.append((name, dtype, tuple(shape), offs[0], offs[1]))
        if expected_offset > self.limits.max_total_bytes:
            raise ProtocolError(f"payload declares {expected_offset} data bytes (limit {self.limits.max_total_bytes})")
        if self.schema is not None:
            self._check_schema(entries)
        self._entries = entries
        self._size = expected_offset
        if self.spool is not None and self.spool.applies(expected_offset):
            self._file = SpoolFile(expected_offset, self.spool)
            self._data = bytearray()  # marks the header as parsed; the data goes to the file
        elif self._borrowed is not None:  # the data stays where it is
            self._data = self._borrowed  # type: ignore[assignment]
            self._base = 8 + (self._header_len or 0)
        else:
            self._data = zeroed_buffer(expected_offset)  # type: ignore[assignment]

    def _check_schema(self, entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]) -> None:
        assert self.schema is not None
        got = {e[0] for e in entries}
        unknown = sorted(got - set(self.schema))
        if unknown:
            raise ProtocolError(f"unknown tensor names: {', '.join(unknown[:5])}")
        missing = sorted(set(self.schema) - got)
        if missing and not self.allow_subset:
            raise ProtocolError(f"missing tensor names: {', '.join(missing[:5])}")
        for name, dtype, shape, _, _ in entries:
            want_shape, want_dtype = self.schema[name]
            if tuple(want_shape) != shape:
                raise ProtocolError(f"tensor {name!r}: shape {list(shape)} but expected {list(want_shape)}")
            if want_dtype is not None and want_dtype != dtype:
                raise ProtocolError(f"tensor {name!r}: dtype {DTYPE_NAMES[dtype]} but expected {DTYPE_NAMES[want_dtype]}")

    # -- streaming ------------------------------------------------------
    def feed(self, chunk: bytes | memoryview | bytearray | mmap.mmap) -> None:
        """Consume the next piece of the payload."""
        mv = memoryview(chunk)
        self.received += len(mv)
        if self._data is None:
            need = 8 if self._header_len is None else 8 + self._header_len
            take = min(len(mv), need - len(self._prefix))
            self._prefix += mv[:take]
            mv = mv[take:]
            if self._header_len is None and len(self._prefix) >= 8:
                (self._header_len,) = struct.unpack("<Q", bytes(self._prefix[:8]))
                if self._header_len > self.limits.max_header_bytes:
                    raise ProtocolError(f"payload header of {self._header_len} bytes (limit {self.limits.max_header_bytes})")
                need = 8 + self._header_len
                take = min(len(mv), need - len(self._prefix))
                self._prefix += mv[:take]
                mv = mv[take:]
            if self._header_len is not None and len(self._prefix) == 8 + self._header_len:
                self._parse_header(bytes(self._prefix[8:]))
            if self._data is None:
                return
        if len(mv) == 0:
            return
        assert self._data is not None
        if self._filled + len(mv) > self._size:
            raise ProtocolError(f"payload is longer than its header declares ({self._size} data bytes)")
        if self._file is not None:
            self._file.write(mv)
        elif self._borrowed is None:
            write_into(self._data, self._filled, mv)
        if self.on_data is not None:  # once stored: a piece whose write failed is fed again on resume
            self.on_data(self._entries, self._filled, mv)
        self._filled += len(mv)

    def tensor_sizes(self) -> list[tuple[str, int]] | None:
        """(name, data bytes) of every tensor the header declares; None until the header is parsed."""
        if self._data is None:
            return None
        return [(name, end - start) for name, _dtype, _shape, start, end in self._entries]

    @property
    def spooled(self) -> bool:
        """True when the data goes to a temporary file (known once the header is parsed)."""
        return self._file is not None

    def finish(self) -> AdapterState:
        """Return the decoded state; raises ProtocolError when the payload is incomplete."""
        if self._data is None:
            raise ProtocolError("payload ended before its header was complete")
        if self._filled != self._size:
            raise ProtocolError(f"payload truncated: {self._filled} of {self._size} data bytes")
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        if self._file is not None:
            maps = {}
            for name, dtype, shape, start, end in self._entries:
                tensors[name], mm = self._file.tensor(dtype, shape, start, end)
                if mm is not None:
                    maps[name] = mm
            return SpooledState(tensors, self._meta, self._file, maps)
        buf = self._data
        for name, dtype, shape, start, end in self._entries:
            if end == start:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            tensors[name] = torch.frombuffer(buf, dtype=dtype, offset=self._base + start, count=count).reshape(shape)
        return AdapterState(tensors, self._meta)

    def decode_in_place(self, payload: bytearray | mmap.mmap) -> AdapterState:
        """The state of a whole payload held in a writable buffer, validated as :meth:`feed` and
        :meth:`finish` do, whose tensors *view* ``payload``: no copy and no allocation (the
        header is padded to 8 bytes, so each tensor sits at the alignment it would have in a
        buffer of its own). They share its memory: ``payload`` must not be changed while they
        are in use (each holds a reference to it)."""
        self._borrowed = payload
        self.feed(memoryview(payload))
        return self.finish()


def decode_state(
    payload: bytes | memoryview | bytearray | mmap.mmap,
    schema: Schema | None = None,
    limits: Limits = Limits(),
    allow_subset: bool = False,
    spool: SpoolPolicy | None = None,
    in_place: bool = False,
) -> AdapterState:
    """Decode a whole payload at once (validating it the same way the streaming decoder does).

    ``in_place``: when ``payload`` is a writable buffer (``bytearray``, ``mmap``) the tensors view
    it instead of a copy (:meth:`StateDecoder.decode_in_place`; the caller must then leave the
    buffer alone while they are in use); other payloads are copied as usual."""
    dec = StateDecoder(schema, limits, allow_subset, spool)
    if in_place and spool is None and isinstance(payload, bytearray | mmap.mmap):
        return dec.decode_in_place(payload)
    dec.feed(payload)
    return dec.finish()
