"""Split-mode wire: the one place where split protobuf messages are built and read.

A :class:`Channel` sends and receives *logical* messages ``(kind, fields, tensors)`` over any
pair of "send one proto" / "receive one proto" callables (a gRPC stream in practice). Tensor
payloads use dpeft's tensor codec (safetensors layout, validating decoder); activations and
their gradients may be cast to fp16/bf16 on the wire, adapter tensors always travel as they
are. Payloads larger than ``chunk_bytes`` continue in PayloadChunk messages.

Receiving is lazy: :meth:`Channel.recv` returns an :class:`Incoming` after the first proto
message; ``Incoming.tensors(schema)`` then pulls the remaining chunks and feeds them into a
decoder that checks names, shapes and dtypes against ``schema`` *before* it allocates.
Every proto message crossing a channel is counted (bytes and kinds) and can be observed by a
``tap`` callback (tests use it to prove what crosses the wire).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dpeft._proto.dpeft.v1 import split_pb2 as pb
from dpeft.codec.tensors import DTYPES, Limits, StateDecoder, encode_state
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

WIRE_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: logical kinds each side may send (the oneof field names)
EDGE_KINDS = ("hello", "step_start", "lora_output", "lora_input_grad", "feature_grad", "frozen_factors", "round_update", "goodbye")
CLOUD_KINDS = ("welcome", "lora_input", "features", "lora_output_grad", "step_end", "round_global", "error")
_PAYLOAD_FIELDS = ("payload", "more")

Schema = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class Incoming:
    """A received logical message; call ``tensors(...)`` (or ``skip()``) to consume its payload."""

    def __init__(self, channel: Channel, kind: str, fields: dict[str, Any], first: bytes, more: bool) -> None:
        self.channel = channel
        self.kind = kind
        self.fields = fields
        self._first = first
        self._more = more
        self._consumed = not first and not more

    def tensors(self, schema: Schema | None, activations: bool = False, allow_subset: bool = False) -> OrderedDict[str, torch.Tensor]:
        """Decode the payload, validating it against ``schema`` (name -> (shape, dtype)) first.

        With ``activations`` the floating-point entries of the schema are expected in the wire
        dtype and are returned as float32.
        """
        if self._consumed:
            if schema:
                raise ProtocolError(f"{self.kind}: expected a payload with {', '.join(list(schema)[:4])}")
            return OrderedDict()
        want = None
        if schema is not None:
            wire = self.channel.wire_dtype if activations else None
            want = OrderedDict(
                (k, (tuple(shape), wire if (wire is not None and dtype.is_floating_point) else dtype)) for k, (shape, dtype) in schema.items()
            )
        dec = StateDecoder(want, self.channel.limits, allow_subset=allow_subset)
        dec.feed(self._first)
        for data in self._rest():
            dec.feed(data)
        self._consumed = True
        state = dec.finish()
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, v in state.items():
            if activations and v.dtype.is_floating_point and v.dtype != torch.float32:
                v = v.to(torch.float32)
            out[k] = v
        return out

    def skip(self) -> None:
        """Discard the payload (bounded by the channel's limits)."""
        if not self._consumed:
            total = len(self._first)
            for data in self._rest():
                total += len(data)
                if total > self.channel.limits.max_total_bytes:
                    raise ProtocolError(f"{self.kind}: payload over {self.channel.limits.max_total_bytes} bytes")
            self._consumed = True

    def _rest(self):
        while self._more:
            msg = self.channel._recv_proto()
            if msg is None:
                raise ConnectionError(f"stream ended in the middle of a {self.kind} payload")
            if msg.WhichOneof("kind") != "chunk":
                raise ProtocolError(f"expected a payload chunk of {self.kind}, got {msg.WhichOneof('kind')}")
            self._more = msg.chunk.more
            yield msg.chunk.data


class Channel:
    """Logical messages over one bidirectional stream (one side of it)."""

    def __init__(
        self,
        side: str,
        send_proto: Callable[[Any], None],
        recv_proto: Callable[[], Any],
        *,
        chunk_bytes: int = 4 * 1024 * 1024,
        wire_dtype: str = "fp32",
        limits: Limits = Limits(max_total_bytes=1 << 31),
        tap: Callable[[str, Any], None] | None = None,
    ) -> None:
        if side not in ("edge", "cloud"):
            raise ValueError(side)
        self.side = side
        self._out_cls = pb.EdgeMessage if side == "edge" else pb.CloudMessage
        self._in_cls = pb.CloudMessage if side == "edge" else pb.EdgeMessage
        self._send_kinds = EDGE_KINDS if side == "edge" else CLOUD_KINDS
        self._recv_kinds = CLOUD_KINDS if side == "edge" else EDGE_KINDS
        self._send = send_proto
        self._recv = recv_proto
        self.chunk_bytes = chunk_bytes
        self.set_wire_dtype(wire_dtype)
        self.limits = limits
        self.tap = tap
        self.bytes_sent = 0
        self.bytes_received = 0
        self.sent_kinds: Counter[str] = Counter()
        self.received_kinds: Counter[str] = Counter()
        self._pending: Incoming | None = None
        self._lock = threading.Lock()

    def set_wire_dtype(self, name: str) -> None:
        if name not in WIRE_TORCH:
            raise ProtocolError(f"unknown wire dtype {name!r}")
        self.wire_name = name
        self.wire_dtype = WIRE_TORCH[name]

    # -- sending ------------------------------------------------------------
    def send(self, kind: str, tensors: Mapping[str, torch.Tensor] | None = None, activations: bool = False, **fields: Any) -> None:
        """Send one logical message; float tensors are cast to the wire dtype when ``activations``."""
        if kind not in self._send_kinds:
            raise ValueError(f"{self.side} cannot send {kind!r}")
        message_type = self._out_cls.DESCRIPTOR.fields_by_name[kind].message_type
        assert message_type is not None, f"{kind!r} is a message field of the envelope"
        sub_cls = getattr(pb, message_type.name)
        if "groups" in fields:
            fields["groups"] = [pb.ModuleGroup(modules=list(g)) for g in fields["groups"]]
        payload = b""
        if tensors:
            prepared: OrderedDict[str, torch.Tensor] = OrderedDict()
            for k, t in tensors.items():
                t = t.detach().cpu()  # a GPU tensor is encoded from host memory
                if activations and t.dtype.is_floating_point:
                    t = t.to(self.wire_dtype)
                prepared[k] = t
            payload = encode_state(AdapterState(prepared))
        has_payload = "payload" in sub_cls.DESCRIPTOR.fields_by_name
        if payload and not has_payload:
            raise ValueError(f"{kind} carries no payload")
        with self._lock:
            if has_payload:
                first, rest = payload[: self.chunk_bytes], payload[self.chunk_bytes :]
                sub = sub_cls(**fields, payload=first, more=bool(rest))
            else:
                rest = b""
                sub = sub_cls(**fields)
            self._emit(self._out_cls(**{kind: sub}), kind)
            while rest:
                piece, rest = rest[: self.chunk_bytes], rest[self.chunk_bytes :]
                self._emit(self._out_cls(chunk=pb.PayloadChunk(data=piece, more=bool(rest))), "chunk")

    def _emit(self, msg: Any, kind: str) -> None:
        self.bytes_sent += msg.ByteSize()
        self.sent_kinds[kind] += 1
        if self.tap is not None:
            self.tap(f"{self.side}->", msg)
        self._send(msg)

    # -- receiving ----------------------------------------------------------
    def _recv_proto(self) -> Any:
        msg = self._recv()
        if msg is None:
            return None
        if not isinstance(msg, self._in_cls):
            raise ProtocolError(f"unexpected message type {type(msg).__name__}")
        self.bytes_received += msg.ByteSize()
        kind = msg.WhichOneof("kind")
        self.received_kinds[kind or "?"] += 1
        if self.tap is not None:
            self.tap(f"->{self.side}", msg)
        return msg

    def recv(self, expect: str | tuple[str, ...] | None = None) -> Incoming:
        """The next logical message (``expect``: the kind(s) allowed here)."""
        if self._pending is not None and not self._pending._consumed:
            self._pending.skip()
        msg = self._recv_proto()
        if msg is None:
            raise ConnectionError("the other side closed the stream")
        kind = msg.WhichOneof("kind")
        if kind not in self._recv_kinds:
            raise ProtocolError(f"unexpected message {kind!r} on the {self.side} side")
        sub = getattr(msg, kind)
        if kind == "error":
            raise ProtocolError(f"the cloud reported: {sub.message}")
        if expect is not None:
            allowed = (expect,) if isinstance(expect, str) else expect
            if kind not in allowed:
                raise ProtocolError(f"expected {' or '.join(allowed)}, got {kind}")
        fields: dict[str, Any] = {}
        for f in sub.DESCRIPTOR.fields:
            if f.name in _PAYLOAD_FIELDS:
                continue
            value = getattr(sub, f.name)
            if f.name == "groups":
                value = [list(g.modules) for g in value]
            elif f.is_repeated:
                value = list(value)
            fields[f.name] = value
        first = getattr(sub, "payload", b"") if "payload" in sub.DESCRIPTOR.fields_by_name else b""
        more = bool(getattr(sub, "more", False))
        self._pending = Incoming(self, kind, fields, first, more)
        return self._pending


def activation_schema(shapes: Mapping[str, tuple[int, ...]]) -> OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A float32 schema for activation tensors (the channel substitutes the wire dtype)."""
    return OrderedDict((k, (tuple(s), torch.float32)) for k, s in shapes.items())


__all__ = ["CLOUD_KINDS", "DTYPES", "EDGE_KINDS", "Channel", "Incoming", "WIRE_TORCH", "activation_schema"]
