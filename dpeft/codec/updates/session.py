"""Update codecs wired into a run: what the worker and the coordinator call per payload.

``RunCodecs.from_config(cfg)`` reads the ``codec`` config section (``up``, ``down``,
``options``, ``error_feedback``, ``residual_dir``):

- worker, upload: :meth:`RunCodecs.encode_update` turns a client's delta into bytes through the
  ``up`` codec; when the codec is lossy and ``error_feedback`` is on, through an
  :class:`ErrorFeedback` whose per-client residuals live in a :class:`DiskResidualStore`
  (one small file per client, so thousands of clients cost disk, not RAM);
- coordinator, upload: :meth:`RunCodecs.update_decoder` is a streaming decoder whose header
  check uses ``codec.wire_schema(schema)`` (nothing is allocated before the header matches the
  exact wire layout the codec implies) and whose ``finish()`` returns ``codec.decode(...)``;
- coordinator, download: :meth:`RunCodecs.encode_global` encodes the global adapter once per
  round through the ``down`` codec; worker: :meth:`RunCodecs.decode_global`.

``fp32`` in a direction means the plain payload (exactly what a run without codecs sends), so
the default run, checkpoints and tools that speak the plain format are unaffected.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dpeft.codec.spool import SpoolPolicy
from dpeft.codec.tensors import DTYPES, Limits, Schema, StateDecoder, decode_state, encode_state, iter_encoded
from dpeft.codec.updates.base import META_KEY, UpdateCodec
from dpeft.codec.updates.feedback import DiskResidualStore, ErrorFeedback
from dpeft.codec.updates.packed import pack, packed_layout, unpack
from dpeft.codec.updates.registry import CodecSpec
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

PLAIN = "fp32"


def is_plain(codec: UpdateCodec | None) -> bool:
    """True for the identity (no codec record on the wire)."""
    return codec is None or codec.name == PLAIN


class CodecStateDecoder:
    """A :class:`StateDecoder` for the wire form of ``codec`` that returns the decoded state.

    With ``packed`` (the default) the payload is the packed form (:mod:`.packed`): its header
    is checked against the packed sizes the schema implies; otherwise against the codec's
    per-tensor ``wire_schema(schema)``. Either way nothing is allocated before that check.
    """

    def __init__(self, codec: UpdateCodec, schema: Schema, limits: Limits = Limits(), allow_subset: bool = False, packed: bool = True) -> None:
        self.codec = codec
        self.schema = schema
        self.allow_subset = allow_subset and not packed
        self.packed = packed
        expected = packed_layout(codec, schema)[0] if packed else codec.wire_schema(schema)
        self._inner = StateDecoder(expected, limits, self.allow_subset)

    @property
    def received(self) -> int:
        return self._inner.received

    def tensor_sizes(self) -> list[tuple[str, int]] | None:
        """(name, data bytes) of every tensor the wire header declares; None until it is parsed."""
        return self._inner.tensor_sizes()

    def feed(self, chunk: bytes | memoryview) -> None:
        self._inner.feed(chunk)

    def finish(self) -> AdapterState:
        wire = self._inner.finish()
        if self.packed:
            wire = unpack(self.codec, wire, self.schema)
        return self.codec.decode(wire, self.schema, self.allow_subset)


def _schema_from_record(wire: AdapterState) -> Schema:
    """The original schema a (trusted) sender recorded in the codec record."""
    record = wire.meta.get(META_KEY)
    orig = record.get("orig") if isinstance(record, dict) else None
    if not isinstance(orig, list):
        raise ProtocolError("encoded global adapter has no codec record")
    schema: OrderedDict[str, tuple[tuple[int, ...], torch.dtype]] = OrderedDict()
    for entry in orig:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise ProtocolError("codec record 'orig' entries must be [name, shape, dtype]")
        dtype = DTYPES.get(entry[2]) if isinstance(entry[2], str) else None
        if dtype is None or not all(type(d) is int and d >= 0 for d in entry[1]):
            raise ProtocolError(f"codec record entry for {entry[0]!r} is malformed")
        schema[entry[0]] = (tuple(entry[1]), dtype)
    return schema


class RunCodecs:
    """The up/down codecs of one run, plus the worker's error-feedback state."""

    def __init__(
        self,
        up: UpdateCodec,
        down: UpdateCodec,
        *,
        error_feedback: bool = True,
        residual_dir: str | os.PathLike[str] | None = None,
        packed: bool = True,
    ) -> None:
        self.up = up
        self.down = down
        self.packed = packed
        self.error_feedback = bool(error_feedback) and not is_plain(up)
        self.residual_dir = Path(residual_dir) if residual_dir is not None else None
        self._feedback: ErrorFeedback | None = None

    @classmethod
    def from_spec(cls, spec: CodecSpec, **kwargs: Any) -> RunCodecs:
        return cls(spec.up_codec(), spec.down_codec(), **kwargs)

    @classmethod
    def from_config(cls, cfg: Any) -> RunCodecs:
        """From a RunConfig (its ``codec`` section; a config without one means fp32 both ways)."""
        section = getattr(cfg, "codec", None)
        if section is None:
            return cls.from_spec(CodecSpec())
        spec = CodecSpec.from_config({"up": section.up, "down": section.down, "options": dict(section.options)})
        residual_dir = section.residual_dir or Path(cfg.run_dir) / "residuals"
        return cls.from_spec(spec, error_feedback=section.error_feedback, residual_dir=residual_dir)

    # -- worker -> coordinator ------------------------------------------------------
    @property
    def feedback(self) -> ErrorFeedback | None:
        """The error-feedback wrapper (created with its disk store on first use), or None."""
        if not self.error_feedback:
            return None
        if self._feedback is None:
            if self.residual_dir is None:
                raise ValueError("error feedback needs a residual_dir")
            self._feedback = ErrorFeedback(self.up, DiskResidualStore(self.residual_dir))
        return self._feedback

    def clear_residuals(self) -> int:
        """Delete every stored residual (a run starting over must not inherit an old run's). Returns how many."""
        if self.residual_dir is None or not self.residual_dir.is_dir():
            return 0
        n = 0
        for path in [*self.residual_dir.glob("c-*" + DiskResidualStore.SUFFIX), *self.residual_dir.glob(".tmp-*")]:
            path.unlink(missing_ok=True)
            n += 1
        return n

    def encode_update(self, client_id: int | str, delta: AdapterState) -> bytes:
        """A client's delta as upload bytes (through the up codec and error feedback)."""
        if is_plain(self.up):
            return encode_state(delta)
        fb = self.feedback
        wire = fb.encode(str(client_id), delta) if fb is not None else self.up.encode(delta)
        return encode_state(pack(self.up, wire, delta.schema()) if self.packed else wire)

    def update_decoder(
        self, schema: Schema, limits: Limits = Limits(), allow_subset: bool = False, spool: SpoolPolicy | None = None
    ) -> StateDecoder | CodecStateDecoder:
        """Streaming decoder for one upload expected to match ``schema``.

        With ``spool``, a plain (fp32) upload at least ``spool.threshold`` bytes large is written
        to a temp file as it arrives and decoded to file-mapped tensors (large adapters)."""
        if is_plain(self.up):
            return StateDecoder(schema, limits, allow_subset, spool)
        return CodecStateDecoder(self.up, schema, limits, allow_subset, packed=self.packed)

    # -- coordinator -> worker ------------------------------------------------------
    def encode_global(self, state: AdapterState) -> bytes:
        """The global adapter payload of a round."""
        if is_plain(self.down):
            return encode_state(state)
        return encode_state(self.down.encode(state))

    def iter_global(self, state: AdapterState) -> Iterator[memoryview]:
        """:meth:`encode_global` as zero-copy pieces (to spool a large global to a file)."""
        return iter_encoded(state if is_plain(self.down) else self.down.encode(state))

    def decode_global(self, payload: bytes | memoryview | bytearray | mmap.mmap) -> AdapterState:
        """Worker side of :meth:`encode_global` (the coordinator is the trusted side here).

        A payload in a writable buffer (a gRPC worker's download buffer) is decoded in place: the
        tensors view the buffer, no second copy of the global is made. The worker's connection
        overwrites that buffer with the next download only once nothing refers to it."""
        wire = decode_state(payload, in_place=True)
        if is_plain(self.down) and META_KEY not in wire.meta:
            return wire
        if META_KEY not in wire.meta:
            raise ProtocolError(f"global adapter was sent without the {self.down.name} codec record")
        return self.down.decode(wire, _schema_from_record(wire))

