"""Shared helpers for the codec tests: deterministic states and a real-wire round trip."""

from __future__ import annotations

from collections import OrderedDict

import torch

from dpeft.codec.tensors import decode_state, encode_state
from dpeft.codec.updates import UpdateCodec
from dpeft.state import AdapterState

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES: list[tuple[int, ...]] = [(0,), (0, 5), (1,), (), (3, 4), (513,), (300, 1000)]


def make_state(dtype: torch.dtype, shapes: list[tuple[int, ...]] = SHAPES, seed: int = 0, zeros: bool = False) -> AdapterState:
    """One tensor per shape, named layer.<i>.lora_A (randn, or zeros); meta round/method."""
    g = torch.Generator().manual_seed(seed)
    tensors = OrderedDict()
    for i, shape in enumerate(shapes):
        t = torch.zeros(shape) if zeros else torch.randn(shape, generator=g)
        tensors[f"layer.{i}.lora_A"] = t.to(dtype)
    return AdapterState(tensors, {"round": 7, "method": "lora"})


def through_wire(codec: UpdateCodec, state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(wire state as received, decoded state): encode, serialize, parse with schema, decode."""
    schema = state.schema()
    wire = decode_state(encode_state(codec.encode(state)), codec.wire_schema(schema))
    return wire, codec.decode(wire, schema)
