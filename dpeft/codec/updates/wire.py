"""Bytes-level helpers: size of a wire state, and codec + payload in one call each way."""

from __future__ import annotations

from dpeft.codec.tensors import Limits, Schema, decode_state, encode_state, encoded_size
from dpeft.codec.updates.base import UpdateCodec
from dpeft.state import AdapterState


def wire_bytes(state: AdapterState) -> int:
    """Exact number of bytes ``encode_state(state)`` takes (without encoding the data)."""
    return encoded_size(state)


def encode_update(codec: UpdateCodec, state: AdapterState) -> bytes:
    """``state`` through ``codec`` and into a payload."""
    return encode_state(codec.encode(state))


def decode_update(codec: UpdateCodec, payload: bytes | memoryview, schema: Schema, limits: Limits = Limits(), allow_subset: bool = False) -> AdapterState:
    """Payload -> original-form state; the payload header is checked against the exact wire
    schema ``codec`` implies for ``schema`` before anything is allocated."""
    wire = decode_state(payload, codec.wire_schema(schema), limits, allow_subset)
    return codec.decode(wire, schema, allow_subset)
