"""Composed codecs (``topk+int8``): each stage transforms the value parts of the previous one.

For ``a+b``, ``a`` encodes the original tensor; every part ``a`` marks as a value (e.g.
``w::val``) is encoded again by ``b`` under its own name (``w::val::q``, ``w::val::scale``),
while auxiliary parts (``w::idx``) pass through. Decoding runs the stages in reverse.
A terminal stage (``int8``) leaves no value parts, so it may only come last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dpeft.codec.updates.base import Part, Shape, UpdateCodec


class ChainCodec(UpdateCodec):
    """Apply ``stages`` in order on encode and in reverse on decode."""

    def __init__(self, stages: Sequence[UpdateCodec]) -> None:
        if len(stages) < 2:
            raise ValueError("a chain needs at least two stages")
        for s in stages[:-1]:
            if s.terminal:
                raise ValueError(f"codec {s.name!r} leaves nothing to transform; it must be the last stage")
        self.stages = tuple(stages)
        self.name = "+".join(s.name for s in stages)
        self.terminal = stages[-1].terminal
        self._head = stages[0]
        self._tail: UpdateCodec = stages[1] if len(stages) == 2 else ChainCodec(stages[1:])

    def params(self) -> dict[str, Any]:
        return {s.name: s.params() for s in self.stages}

    def layout(self, name: str, shape: Shape, dtype: torch.dtype) -> OrderedDict[str, Part]:
        out: OrderedDict[str, Part] = OrderedDict()
        for pname, part in self._head.layout(name, shape, dtype).items():
            sub = self._tail.layout(pname, part.shape, part.dtype) if part.is_value else {pname: Part(part.shape, part.dtype)}
            for k, v in sub.items():
                if k in out:
                    raise ValueError(f"codec {self.name}: part name {k!r} produced twice")
                out[k] = v
        return out

    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        head_layout = self._head.layout(name, tuple(x.shape), x.dtype)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for pname, t in self._head.encode_tensor(name, x).items():
            if head_layout[pname].is_value:
                out.update(self._tail.encode_tensor(pname, t))
            else:
                out[pname] = t
        return out

    def decode_tensor(self, name: str, shape: Shape, dtype: torch.dtype, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sub: dict[str, torch.Tensor] = {}
        for pname, part in self._head.layout(name, shape, dtype).items():
            if part.is_value:
                sub[pname] = self._tail.decode_tensor(pname, part.shape, part.dtype, parts)
            else:
                sub[pname] = parts[pname]
        return self._head.decode_tensor(name, shape, dtype, sub)
