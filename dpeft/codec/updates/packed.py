"""Packed wire form of an encoded update: one flat tensor per dtype, no per-tensor header.

A codec's wire layout is a pure function of the receiver's trusted schema and the codec's
parameters (:meth:`UpdateCodec.wire_schema`), so the names and shapes of the wire tensors need
not travel at all. For a small adapter they are a large part of the bytes: MiniLM's LoRA r=8
update is 74.5k values; as int8 that is 75.7 kB of data but 8 kB of per-tensor header and codec
record. Packed, the payload carries ``packed::I8``, ``packed::F32`` ... (the wire tensors of
the whole update, flattened in a canonical order and concatenated per dtype) and a record
``{"codec", "params", "layout"}`` whose ``layout`` is a digest of the codec and of the sorted
(name, shape, dtype) list. The receiver computes the same digest from its own schema; any
disagreement (other adapter, other codec parameters) is a ProtocolError before any slicing,
and the packed sizes themselves are checked against the schema by the payload decoder before
anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

import torch

from dpeft.codec.tensors import DTYPE_NAMES, Schema
from dpeft.codec.updates.base import META_KEY, Shape, UpdateCodec, numel_of
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

PACK_KEY = "update_codec_packed"
PREFIX = "packed::"

WireEntries = list[tuple[str, Shape, torch.dtype]]


def _sorted_schema(schema: Schema) -> OrderedDict[str, tuple[Shape, torch.dtype]]:
    return OrderedDict((n, (tuple(int(d) for d in schema[n][0]), schema[n][1])) for n in sorted(schema))


def layout_digest(codec: UpdateCodec, schema: Schema) -> str:
    """Digest of the codec (name, params) and the sorted (name, shape, dtype) list."""
    doc = {
        "codec": codec.name,
        "params": codec.params(),
        "tensors": [[n, list(s), DTYPE_NAMES[d]] for n, (s, d) in _sorted_schema(schema).items()],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def packed_layout(codec: UpdateCodec, schema: Schema) -> tuple[OrderedDict[str, tuple[Shape, torch.dtype]], dict[torch.dtype, WireEntries]]:
    """(packed schema for the payload decoder, wire entries per dtype in packing order)."""
    wire = codec.wire_schema(_sorted_schema(schema))
    groups: dict[torch.dtype, WireEntries] = {}
    for name, (shape, dtype) in wire.items():
        groups.setdefault(dtype, []).append((name, tuple(shape), dtype))
    order = sorted(groups, key=lambda d: DTYPE_NAMES[d])
    packed: OrderedDict[str, tuple[Shape, torch.dtype]] = OrderedDict()
    for d in order:
        packed[PREFIX + DTYPE_NAMES[d]] = ((sum(numel_of(s) for _, s, _ in groups[d]),), d)
    return packed, {d: groups[d] for d in order}


def pack(codec: UpdateCodec, wire: AdapterState, schema: Schema) -> AdapterState:
    """The packed form of ``wire`` (``codec.encode`` of a state whose schema is ``schema``)."""
    packed_schema, groups = packed_layout(codec, schema)
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for d, entries in groups.items():
        flat = [wire.tensors[n].reshape(-1) for n, _, _ in entries]
        name = PREFIX + DTYPE_NAMES[d]
        tensors[name] = torch.cat(flat) if flat else torch.empty(0, dtype=d)
        if tuple(tensors[name].shape) != packed_schema[name][0]:  # pragma: no cover - codec bug
            raise RuntimeError(f"packed {name} has {tensors[name].numel()} elements, expected {packed_schema[name][0]}")
    meta: dict[str, Any] = {k: v for k, v in wire.meta.items() if k != META_KEY}
    meta[PACK_KEY] = {"codec": codec.name, "params": codec.params(), "layout": layout_digest(codec, schema)}
    return AdapterState(tensors, meta)


def unpack(codec: UpdateCodec, packed: AdapterState, schema: Schema) -> AdapterState:
    """Back to the codec's wire form (with its record), after checking the packed record."""
    record = packed.meta.get(PACK_KEY)
    if not isinstance(record, dict) or set(record) != {"codec", "params", "layout"}:
        raise ProtocolError(f"packed update has no valid record (meta {PACK_KEY!r})")
    if record["codec"] != codec.name:
        raise ProtocolError(f"update was encoded with codec {record['codec']!r}, expected {codec.name!r}")
    if record["params"] != codec.params():
        raise ProtocolError(f"update was encoded with {codec.name} parameters {record['params']!r}, expected {codec.params()!r}")
    if record["layout"] != layout_digest(codec, schema):
        raise ProtocolError("packed update was made for another adapter layout (names, shapes or dtypes differ)")
    packed_schema, groups = packed_layout(codec, schema)
    if list(packed.tensors) != list(packed_schema):
        raise ProtocolError(f"packed update carries {list(packed.tensors)}, expected {list(packed_schema)}")
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for d, entries in groups.items():
        buf = packed.tensors[PREFIX + DTYPE_NAMES[d]]
        if buf.dtype != d or tuple(buf.shape) != packed_schema[PREFIX + DTYPE_NAMES[d]][0]:
            raise ProtocolError(f"packed tensor {PREFIX + DTYPE_NAMES[d]!r} has the wrong dtype or size")
        at = 0
        for name, shape, _ in entries:
            n = numel_of(shape)
            tensors[name] = buf[at : at + n].reshape(shape)
            at += n
    meta: dict[str, Any] = {k: v for k, v in packed.meta.items() if k != PACK_KEY}
    meta[META_KEY] = {
        "codec": codec.name,
        "params": codec.params(),
        "orig": [[n, list(s), DTYPE_NAMES[d]] for n, (s, d) in _sorted_schema(schema).items()],
    }
    return AdapterState(tensors, meta)
