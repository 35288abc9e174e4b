"""``int8``: blockwise absmax quantization over the flattened tensor.

The flattened tensor is cut into blocks of ``block_size`` elements (the last may be short).
Per block ``scale = absmax / 127`` (fp32) and ``q = round(x / scale)`` in [-127, 127], so
``|x - q * scale| <= scale / 2`` per element (up to fp32 rounding). Wire parts:
``<name>::q`` int8 of shape (numel,) and ``<name>::scale`` fp32 of shape (ceil(numel/B),).
An all-zero block has scale 0 and decodes to exact zeros.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dpeft.codec.updates.base import SEP, Part, Shape, UpdateCodec, numel_of
from dpeft.config.options import option
from dpeft.errors import ProtocolError

MAX_BLOCK_SIZE = 1 << 24
_MAX_SCALE = torch.finfo(torch.float32).max / 127


@dataclass(kw_only=True)
class Int8Options:
    """``codec.options`` the int8 codec reads."""

    block_size: int = option(256, f"values sharing one fp32 scale, an integer in [1, {MAX_BLOCK_SIZE}]")


class Int8Codec(UpdateCodec):
    """Blockwise absmax int8 quantization (terminal: nothing may follow it in a chain)."""

    name = "int8"
    terminal = True

    def __init__(self, block_size: int = 256) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an integer in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
        self.block_size = block_size

    def params(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def n_blocks(self, numel: int) -> int:
        """Number of scales for a tensor of ``numel`` elements."""
        return -(-numel // self.block_size)

    def layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        n = numel_of(shape)
        return OrderedDict(
            [
                (name + SEP + "q", Part((n,), torch.int8)),
                (name + SEP + "scale", Part((self.n_blocks(n),), torch.float32)),
            ]
        )

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel()
        nb = self.n_blocks(n)
        return F.pad(flat, (0, nb * self.block_size - n)).view(nb, self.block_size)

    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        flat = x.reshape(-1).to(torch.float32)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"int8 codec: tensor {name!r} has non-finite values")
        blocks = self._blocks(flat)
        scale = blocks.abs().amax(dim=1) / 127.0 if blocks.shape[0] else torch.zeros(0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return OrderedDict(
            [
                (name + SEP + "q", q.reshape(-1)[: flat.numel()].clone()),
                (name + SEP + "scale", scale.contiguous()),
            ]
        )

    def decode_tensor(self, name: str, shape: Shape, dtype: torch.dtype, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        qn, sn = name + SEP + "q", name + SEP + "scale"
        q, scale = parts[qn], parts[sn]
        if q.numel() and int(q.min()) < -127:
            raise ProtocolError(f"wire tensor {qn!r}: value -128 outside [-127, 127]")
        if scale.numel():
            bad = ~(torch.isfinite(scale) & (scale >= 0) & (scale <= _MAX_SCALE))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ProtocolError(f"wire tensor {sn!r}: scale[{i}] = {float(scale[i])!r} is not in [0, {_MAX_SCALE:.3e}]")
        x = self._blocks(q.to(torch.float32)) * scale[:, None]
        return x.reshape(-1)[: q.numel()].reshape(shape).to(dtype)
