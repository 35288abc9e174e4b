"""Cast codecs: ``fp32`` (lossless for fp32/fp16/bf16 deltas), ``fp16`` and ``bf16``.

Each tensor travels under its own name in the target dtype and is cast back to its original
dtype on decode. Values beyond the target's finite range are clamped to it rather than turned
into infinities, so the error stays finite (and error feedback can carry the rest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from dpeft.codec.updates.base import Part, Shape, UpdateCodec


class CastCodec(UpdateCodec):
    """Send each floating tensor as ``dtype``."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"cast codec needs a floating dtype, got {dtype}")
        self.name = name
        self.dtype = dtype

    def params(self) -> dict[str, Any]:
        return {}

    def layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        return OrderedDict([(name, Part(shape, self.dtype, True))])

    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        fmax = torch.finfo(self.dtype).max
        if x.dtype != self.dtype and torch.finfo(x.dtype).max > fmax and x.numel():
            # clamp in a dtype that represents fmax exactly (bf16 would round 65504 up to 65536)
            x = x.to(torch.promote_types(x.dtype, torch.float32)).clamp(-fmax, fmax)
        return OrderedDict([(name, x.to(self.dtype))])

    def decode_tensor(self, name: str, shape: Shape, dtype: torch.dtype, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts[name].to(dtype)


def fp32() -> CastCodec:
    """Identity for fp32 deltas (and lossless for fp16/bf16 ones)."""
    return CastCodec("fp32", torch.float32)


def fp16() -> CastCodec:
    """Half precision: relative error <= 2**-11 for normal values."""
    return CastCodec("fp16", torch.float16)


def bf16() -> CastCodec:
    """bfloat16: relative error <= 2**-8, fp32's range."""
    return CastCodec("bf16", torch.bfloat16)
