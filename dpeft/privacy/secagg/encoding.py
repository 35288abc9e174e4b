"""Fixed-point encoding of a weighted update in the ring of integers modulo ``2**bits``.

A client with weight ``w`` (its example count, at most ``max_weight``) and update ``x`` (the
adapter delta, flattened in sorted tensor-name order) sends the vector

    [ round(w * clip(x, -c, c) * s)  ...,  w,  round(w * min(loss, LOSS_MAX) * s * c / LOSS_MAX),  u ]

modulo ``M = 2**bits``, where ``c`` is ``privacy.secagg_clip_range`` and the scale is
``s = floor((2**(bits-1) - 1) / (n * max_weight * c))`` for ``n`` clients in the round. Each
entry of a client's vector is then at most ``max_weight * c * s <= (2**(bits-1) - 1) / n`` in
magnitude, so the sum over up to ``n`` clients never wraps around: read as a signed number it
is the exact integer sum. The coordinator divides by ``s`` to get ``sum(w * x)`` to within
``n / (2 s)`` per coordinate (the quantisation step ``1 / s``, half a step per client), gets
``sum(w)`` exactly and the example-weighted train loss to within ``n * LOSS_MAX / (2 s c)``.
``u`` is 1 when the client's update was within its central-DP clip bound (adaptive clipping
counts those; 0 otherwise). Under central DP every client has weight 1 (the noise is calibrated
to unit-weight sums).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from dpeft.state import AdapterState

#: train losses are clipped to this before they are encoded
LOSS_MAX = 1000.0
#: extra coordinates after the update: the weight, the weighted train loss, the clip bit
EXTRA = 3


def modulus(bits: int) -> int:
    return 1 << bits


def scale_for(bits: int, clients: int, max_weight: int, clip: float) -> float:
    """The fixed-point scale ``s`` for ``clients`` clients (see the module docstring)."""
    s = math.floor((2 ** (bits - 1) - 1) / (clients * max_weight * clip))
    if s < 1 or clients * max_weight >= 2 ** (bits - 1):
        raise ValueError(
            f"{bits} bits cannot hold the sum of {clients} clients of weight up to {max_weight} with clip range {clip}"
        )
    return float(s)


def layout(schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each tensor in vector order (sorted names)."""
    return [(name, tuple(schema[name][0])) for name in sorted(schema)]


def vector_length(schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) for _, shape in layout(schema)) + EXTRA


def encode(
    delta: AdapterState, weight: int, loss: float, bits: int, scale: float, clip: float, unclipped: float = 0.0
) -> np.ndarray:
    """A client's weighted update as uint64 residues modulo ``2**bits`` (in the order of :func:`layout`)."""
    parts = [delta[name].detach().to(torch.float64).reshape(-1).numpy() for name, _ in layout(delta.schema())]
    x = np.concatenate(parts) if parts else np.zeros(0)
    q = np.rint(np.clip(x, -clip, clip) * (weight * scale)).astype(np.int64)
    loss = min(max(float(loss), 0.0), LOSS_MAX) if math.isfinite(loss) else LOSS_MAX
    extra = np.array([weight, round(weight * loss * scale * clip / LOSS_MAX), 1 if unclipped >= 0.5 else 0], dtype=np.int64)
    return to_ring(np.concatenate([q, extra]), bits)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed int64 values as residues modulo ``2**bits`` (uint64)."""
    out = values.astype(np.int64).view(np.uint64)
    if bits < 64:
        out = out & np.uint64((1 << bits) - 1)
    return out


def to_signed(residues: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo ``2**bits`` read as signed numbers in [-2**(bits-1), 2**(bits-1))."""
    r = residues.astype(np.uint64)
    if bits == 64:
        return r.view(np.int64)
    half = np.uint64(1 << (bits - 1))
    signed = r.astype(np.int64)
    return np.where(r >= half, signed - np.int64(1 << bits), signed)


def decode(
    total: np.ndarray, schema: Mapping[str, tuple[tuple[int, ...], torch.dtype]], bits: int, scale: float, clip: float
) -> tuple[AdapterState, int, float, int]:
    """(sum of the weighted updates, sum of the weights, sum of weight x train loss, clip bits) from the summed residues."""
    signed = to_signed(total, bits)
    values = signed[:-EXTRA].astype(np.float64) / scale
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    at = 0
    for name, shape in layout(schema):
        n = math.prod(shape)
        tensors[name] = torch.from_numpy(values[at : at + n].copy()).reshape(shape).to(schema[name][1])
        at += n
    weight = int(signed[-3])
    loss_sum = float(signed[-2]) * LOSS_MAX / (scale * clip)
    return AdapterState(tensors), weight, loss_sum, int(signed[-1])


def wire_dtype(bits: int) -> torch.dtype:
    """The tensor dtype a masked vector travels in (the residues' bit pattern)."""
    return torch.int32 if bits <= 32 else torch.int64


def to_wire(residues: np.ndarray, bits: int) -> torch.Tensor:
    if bits <= 32:
        return torch.from_numpy(residues.astype(np.uint32).view(np.int32).copy())
    return torch.from_numpy(residues.astype(np.uint64).view(np.int64).copy())


def from_wire(tensor: torch.Tensor, bits: int) -> np.ndarray:
    arr = tensor.detach().cpu().numpy()
    if bits <= 32:
        return arr.astype(np.int32).view(np.uint32).astype(np.uint64)
    return arr.astype(np.int64).view(np.uint64)
