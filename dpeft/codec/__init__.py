"""AdapterState <-> bytes. Raw little-endian tensors with dtype and shape; never pickle."""

from dpeft.codec.tensors import Limits, StateDecoder, decode_state, encode_state, iter_chunks

__all__ = ["StateDecoder", "Limits", "decode_state", "encode_state", "iter_chunks"]
