"""Content checks of a decoded client update: finite values and an optional L2-norm bound.

The round core runs them on every accepted update; a transport that already walks an upload
(gRPC) runs them itself and hands the norm along (``TaskResult.norm``).
"""

from __future__ import annotations

import math

import torch

from dpeft.codec.spool import release
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState

#: elements per slice when an update's norm is computed (bounds the temporaries to a few MiB)
_NORM_SLICE = 1 << 20


def check_update(delta: AdapterState) -> float:
    """Content checks of a decoded update: every floating value finite. Returns its global L2 norm.

    One pass, tensor by tensor in slices (float64 accumulation, no full-size temporaries); a
    spooled update gives its pages back every few slices, so a pass costs a few MiB of RAM. Raises
    ``RejectedUpdate("non_finite")`` naming the first tensor with a NaN or Inf.
    """
    total = 0.0
    for name, t in delta.items():
        if t.is_floating_point() and t.numel():
            sq = 0.0
            for j, piece in enumerate(t.reshape(-1).split(_NORM_SLICE)):
                sq += float(torch.linalg.vector_norm(piece, dtype=torch.float64)) ** 2
                if j % 8 == 7:  # a spooled tensor keeps at most ~8 slices of pages resident
                    release(delta, name)
            if not math.isfinite(sq) and not bool(t.isfinite().all()):
                raise RejectedUpdate("non_finite", f"tensor {name} has NaN or Inf")
            total += sq
        release(delta, name)
    return math.sqrt(total)


def check_norm(norm: float, max_norm: float | None) -> None:
    """``RejectedUpdate("norm")`` when ``norm`` exceeds ``max_norm`` (``transport.max_update_norm``; None = no bound)."""
    if max_norm is not None and not norm <= max_norm:
        raise RejectedUpdate("norm", f"update L2 norm {norm:.6g} exceeds the bound {max_norm:g} (transport.max_update_norm)")
