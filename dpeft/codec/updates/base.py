"""The UpdateCodec base class: a per-tensor transform of an AdapterState of deltas.

A codec maps every floating-point tensor ``name`` of a state to one or more *wire parts*
(``name`` itself, or ``name::q`` / ``name::scale`` / ``name::idx`` / ``name::val`` ...)
whose names, shapes and dtypes follow from the original name, shape and dtype and from the
codec's own parameters alone (its :meth:`layout`). Non-floating tensors travel unchanged.

Because the layout is a pure function of trusted inputs (the receiver's schema and its own
configuration), :meth:`decode` first computes the exact wire schema it expects and checks the
incoming (untrusted) wire state against it *before* touching any data; the per-codec
``decode_tensor`` then only has to check contents (index ranges, scale values, ...).

The wire state's meta carries the sender's meta plus a record under ``META_KEY``:
``{"codec": name, "params": {...}, "orig": [[name, shape, dtype], ...]}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from dpeft.codec.tensors import DTYPE_NAMES, DTYPES, Schema
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

META_KEY = "update_codec"
SEP = "::"

Shape = tuple[int, ...]

class Part(NamedTuple):
    """One wire tensor of an encoded original tensor.

    ``is_value`` marks a floating-point part that a following stage of a composed codec
    (``topk+int8``) may transform further; auxiliary parts (indices, scales) are never touched.
    """

    shape: Shape
    dtype: torch.dtype
    is_value: bool = False



def numel_of(shape: Shape) -> int:
    """Number of elements of ``shape`` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


class UpdateCodec(ABC):
    """Base of every update codec. Subclasses implement the four per-tensor methods."""

    #: registry name ("int8", "topk+int8", ...)
    name: str = ""
    #: True when the output has no value parts, so no stage may follow this one
    terminal: bool = False

    # -- per tensor (floating-point originals only) -------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-able parameters; sender and receiver must agree on them exactly."""

    @abstractmethod
    def layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        """The wire parts for one original tensor (a pure function of its arguments)."""

    @abstractmethod
    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Wire parts for ``x``; keys, shapes and dtypes exactly as :meth:`layout` says."""

    @abstractmethod
    def decode_tensor(self, name: str, shape: Shape, dtype: torch.dtype, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Rebuild the original tensor from parts whose shapes/dtypes were already checked.

        Implementations check contents (ranges, finiteness) and raise ProtocolError.
        """

    # -- whole state ----------------------------------------------------------------------
    def full_layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        """:meth:`layout` for floating tensors; a single pass-through part otherwise."""
        if not dtype.is_floating_point:
            return OrderedDict([(name, Part(tuple(shape), dtype))])
        return self.layout(name, tuple(shape), dtype)

    def wire_schema(self, schema: Schema) -> OrderedDict[str, tuple[Shape, torch.dtype]]:
        """The exact wire schema of a full update for ``schema`` (for ``decode_state``)."""
        out: OrderedDict[str, tuple[Shape, torch.dtype]] = OrderedDict()
        for name, (shape, dtype) in schema.items():
            if dtype is None:
                raise ValueError(f"tensor {name!r}: update codecs need a dtype in the schema")
            _merge(out, self.full_layout(name, tuple(shape), dtype), ProtocolError)
        return out

    def encode(self, state: AdapterState) -> AdapterState:
        """The wire form of ``state`` (another AdapterState; meta gains the codec record)."""
        if META_KEY in state.meta:
            raise ValueError(f"state meta already has {META_KEY!r}: is it encoded already?")
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        seen: OrderedDict[str, tuple[Shape, torch.dtype]] = OrderedDict()
        orig: list[list[Any]] = []
        for name, x in state.items():
            if x.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {x.dtype} cannot travel")
            shape = tuple(x.shape)
            layout = self.full_layout(name, shape, x.dtype)
            x = x.detach().cpu()
            parts = self.encode_tensor(name, x) if x.dtype.is_floating_point else OrderedDict([(name, x)])
            _check_parts(self.name, name, layout, parts)
            _merge(seen, layout, ValueError)
            tensors.update(parts)
            orig.append([name, list(shape), DTYPE_NAMES[x.dtype]])
        meta = dict(state.meta)
        meta[META_KEY] = {"codec": self.name, "params": self.params(), "orig": orig}
        return AdapterState(tensors, meta)

    def decode(self, wire: AdapterState, schema: Schema, allow_subset: bool = False) -> AdapterState:
        """Back to original names/shapes/dtypes, validating the untrusted ``wire`` first.

        ``schema`` is the receiver's name -> (shape, dtype) of the adapter. With
        ``allow_subset`` the update may carry only some of its tensors.
        """
        entries = parse_record(wire.meta.get(META_KEY), self.name, self.params(), schema, allow_subset)
        layouts: dict[str, OrderedDict[str, Part]] = {}
        expected: OrderedDict[str, tuple[Shape, torch.dtype]] = OrderedDict()
        for name, shape, dtype in entries:
            layouts[name] = self.full_layout(name, shape, dtype)
            _merge(expected, layouts[name], ProtocolError)
        check_wire(wire, expected)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, shape, dtype in entries:
            parts = {k: wire.tensors[k] for k in layouts[name]}
            if dtype.is_floating_point:
                t = self.decode_tensor(name, shape, dtype, parts)
            else:
                t = parts[name].clone()
            if tuple(t.shape) != shape or t.dtype != dtype:  # pragma: no cover - codec bug
                raise RuntimeError(f"codec {self.name}: decoded {name!r} as {t.dtype}{list(t.shape)}")
            out[name] = t
        meta = {k: v for k, v in wire.meta.items() if k != META_KEY}
        return AdapterState(out, meta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.params()!r})"


def _merge(into: OrderedDict[str, tuple[Shape, torch.dtype]], layout: OrderedDict[str, Part], err: type[Exception]) -> None:
    for wname, part in layout.items():
        if wname in into:
            raise err(f"wire tensor name {wname!r} is produced twice (original names clash)")
        into[wname] = (part.shape, part.dtype)


def _check_parts(codec: str, name: str, layout: OrderedDict[str, Part], parts: Mapping[str, torch.Tensor]) -> None:
    if list(parts) != list(layout):
        raise RuntimeError(f"codec {codec}: {name!r} encoded to parts {list(parts)}, layout says {list(layout)}")
    for k, t in parts.items():
        if tuple(t.shape) != layout[k].shape or t.dtype != layout[k].dtype:
            raise RuntimeError(f"codec {codec}: part {k!r} is {t.dtype}{list(t.shape)}, layout says {layout[k]}")


def parse_record(record: Any, codec: str, params: dict[str, Any], schema: Schema, allow_subset: bool) -> list[tuple[str, Shape, torch.dtype]]:
    """Validate the codec record of an incoming update against our codec and ``schema``.

    Returns (name, shape, dtype) per original tensor, in schema order, with shapes and
    dtypes taken from the trusted schema once the record was found to agree with it.
    """
    if not isinstance(record, dict):
        raise ProtocolError(f"update has no codec record (meta {META_KEY!r})")
    if set(record) != {"codec", "params", "orig"}:
        raise ProtocolError(f"codec record must have keys codec, params, orig; got {sorted(map(str, record))}")
    if record["codec"] != codec:
        raise ProtocolError(f"update was encoded with codec {record['codec']!r}, expected {codec!r}")
    if record["params"] != params:
        raise ProtocolError(f"update was encoded with {codec} parameters {record['params']!r}, expected {params!r}")
    orig = record["orig"]
    if not isinstance(orig, list):
        raise ProtocolError("codec record 'orig' must be a list")
    # every entry is unknown, a duplicate (both raise) or new: at most len(schema) + 1 iterations
    found: dict[str, torch.dtype] = {}
    for i, entry in enumerate(orig):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ProtocolError(f"codec record 'orig' entry {i} must be [name, shape, dtype]")
        name, shape, dname = entry
        if name not in schema:
            raise ProtocolError(f"update carries unknown tensor {name!r}")
        if name in found:
            raise ProtocolError(f"update carries tensor {name!r} twice")
        want_shape, want_dtype = schema[name]
        if not (isinstance(shape, list) and all(type(d) is int for d in shape) and shape == list(want_shape)):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} but expected {list(want_shape)}")
        dtype = DTYPES.get(dname) if isinstance(dname, str) else None
        if dtype is None or (want_dtype is not None and dtype != want_dtype):
            want = DTYPE_NAMES.get(want_dtype, str(want_dtype)) if want_dtype is not None else "a known dtype"
            raise ProtocolError(f"tensor {name!r}: dtype {dname!r} but expected {want}")
        found[name] = dtype
    if not allow_subset and len(found) != len(schema):
        missing = [n for n in schema if n not in found]
        raise ProtocolError(f"update is missing tensors: {', '.join(map(repr, missing[:5]))}")
    return [(n, tuple(int(d) for d in schema[n][0]), found[n]) for n in schema if n in found]


def check_wire(wire: AdapterState, expected: Mapping[str, tuple[Shape, torch.dtype]]) -> None:
    """Wire tensors must be exactly ``expected`` (names, shapes, dtypes); else ProtocolError."""
    unexpected = [n for n in wire.tensors if n not in expected]
    if unexpected:
        raise ProtocolError(f"unexpected wire tensors: {', '.join(map(repr, unexpected[:5]))}")
    missing = [n for n in expected if n not in wire.tensors]
    if missing:
        raise ProtocolError(f"missing wire tensors: {', '.join(map(repr, missing[:5]))}")
    for n, (shape, dtype) in expected.items():
        t = wire.tensors[n]
        if t.dtype != dtype:
            raise ProtocolError(f"wire tensor {n!r}: dtype {DTYPE_NAMES.get(t.dtype, t.dtype)} but expected {DTYPE_NAMES[dtype]}")
        if tuple(t.shape) != tuple(shape):
            raise ProtocolError(f"wire tensor {n!r}: shape {list(t.shape)} but expected {list(shape)}")
