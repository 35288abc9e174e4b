"""Update codecs: lossy/lossless transforms of an AdapterState of deltas before the wire.

``codec.encode(state)`` gives the wire form (another AdapterState, e.g. ``w::q`` int8 plus
``w::scale`` fp32, meta recording the codec and the original names/shapes/dtypes) that
``dpeft.codec.tensors.encode_state`` turns into bytes; ``codec.decode(wire, schema)`` checks
the untrusted wire form against the receiver's schema and restores the original tensors.

Codecs: ``fp32``, ``fp16``, ``bf16`` (casts), ``int8`` (blockwise absmax), ``topk``
(magnitude sparsification), composed with ``+`` (``topk+int8``). ``ErrorFeedback`` carries
what a lossy codec dropped into the client's next update.
"""

from dpeft.codec.updates.base import META_KEY, Part, UpdateCodec
from dpeft.codec.updates.cast import CastCodec
from dpeft.codec.updates.chain import ChainCodec
from dpeft.codec.updates.feedback import DiskResidualStore, ErrorFeedback, MemoryResidualStore, ResidualStore
from dpeft.codec.updates.int8 import Int8Codec
from dpeft.codec.updates.registry import (
    CodecSpec,
    available_codecs,
    codec_from_spec,
    known_options,
    make_codec,
    register_codec,
    registered_codecs,
)
from dpeft.codec.updates.session import CodecStateDecoder, RunCodecs, is_plain
from dpeft.codec.updates.topk import TopKCodec
from dpeft.codec.updates.wire import decode_update, encode_update, wire_bytes

__all__ = [
    "META_KEY",
    "CastCodec",
    "ChainCodec",
    "CodecSpec",
    "CodecStateDecoder",
    "RunCodecs",
    "is_plain",
    "DiskResidualStore",
    "ErrorFeedback",
    "Int8Codec",
    "MemoryResidualStore",
    "Part",
    "ResidualStore",
    "TopKCodec",
    "UpdateCodec",
    "available_codecs",
    "codec_from_spec",
    "decode_update",
    "encode_update",
    "known_options",
    "make_codec",
    "register_codec",
    "registered_codecs",
    "wire_bytes",
]
