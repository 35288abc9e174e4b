"""``topk``: keep the largest-magnitude fraction of each tensor, zero the rest.

Per non-empty tensor of n elements, ``k = clamp(round(fraction * n), 1, n)`` entries with the
largest |x| are sent as ascending flat indices ``<name>::idx`` (int32 when n <= 2**31, else
int64) and their values ``<name>::val`` in the original dtype. The values are a value part,
so ``topk+int8`` / ``topk+fp16`` quantize them further. Decoding checks that indices are
strictly increasing and inside [0, n) before scattering.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dpeft.codec.updates.base import SEP, Part, Shape, UpdateCodec, numel_of
from dpeft.config.options import option
from dpeft.errors import ProtocolError


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index dtype that addresses ``numel`` elements."""
    return torch.int32 if numel <= 1 << 31 else torch.int64


@dataclass(kw_only=True)
class TopKOptions:
    """``codec.options`` the topk codec reads."""

    fraction: float = option(0.01, "fraction of each tensor's entries sent (the largest magnitudes), in (0, 1]")


class TopKCodec(UpdateCodec):
    """Magnitude top-k sparsification per tensor (usually paired with ErrorFeedback)."""

    name = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def k_for(self, numel: int) -> int:
        """How many entries a tensor of ``numel`` elements keeps."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.floor(self.fraction * numel + 0.5)))

    def layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        n = numel_of(shape)
        k = self.k_for(n)
        return OrderedDict(
            [
                (name + SEP + "idx", Part((k,), index_dtype(n))),
                (name + SEP + "val", Part((k,), dtype, True)),
            ]
        )

    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        flat = x.reshape(-1)
        n = flat.numel()
        k = self.k_for(n)
        if k == 0:
            idx = torch.zeros(0, dtype=torch.int64)
        elif k == n:
            idx = torch.arange(n)
        else:
            mag = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.float().abs()
            idx = torch.topk(mag, k, sorted=False).indices.sort().values
        return OrderedDict(
            [
                (name + SEP + "idx", idx.to(index_dtype(n))),
                (name + SEP + "val", flat[idx].clone()),
            ]
        )

    def decode_tensor(self, name: str, shape: Shape, dtype: torch.dtype, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        iname = name + SEP + "idx"
        idx, val = parts[iname].to(torch.int64), parts[name + SEP + "val"]
        n = numel_of(shape)
        out = torch.zeros(n, dtype=dtype)
        if idx.numel():
            bad = (idx < 0) | (idx >= n)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ProtocolError(f"wire tensor {iname!r}: index {int(idx[i])} at position {i} is outside [0, {n})")
            if idx.numel() > 1:
                dup = idx[1:] <= idx[:-1]
                if bool(dup.any()):
                    i = int(dup.nonzero()[0, 0]) + 1
                    raise ProtocolError(f"wire tensor {iname!r}: indices not strictly increasing at position {i}")
            out[idx] = val.to(dtype)
        return out.reshape(shape)
