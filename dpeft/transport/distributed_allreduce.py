"""``torch.distributed`` collectives for aggregation without a coordinator in the path.

Every rank of one process group (gloo on CPU, nccl on GPU, set up the standard way:
``MASTER_ADDR``/``MASTER_PORT``, ``RANK``/``WORLD_SIZE``, ``init_process_group``) folds its
updates into the strategy's own streaming aggregator; :func:`dpeft.rounds.allreduce.allreduce_aggregator` then sums
``sum_i w_i * delta_i`` and ``sum_i w_i`` over the group (float64, so the result matches the
coordinator's :class:`~dpeft.strategies.aggregate.StreamingWeightedMean` to rounding), and
:func:`broadcast_state` gives every rank rank 0's state. The round loop over these lives in
:mod:`dpeft.rounds.allreduce`.

Bytes on paper (S = adapter bytes, N ranks): a star (coordinator) moves S down and S up per
worker and N*S through the coordinator's link each way; a ring all-reduce moves
2*(N-1)/N * S per rank each way, with no hot spot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dpeft.codec import decode_state, encode_state
from dpeft.errors import DpeftError
from dpeft.state import AdapterState

log = logging.getLogger("dpeft.allreduce")

#: all-reduce in buckets of this many bytes (float64), so a 64M-parameter adapter needs no 2x copy
BUCKET_BYTES = 64 << 20


def init_group(backend: str | None = None, timeout_s: float = 1800.0, device: torch.device | None = None) -> str:
    """``init_process_group`` from the standard environment variables; returns the backend.

    ``device``: where this rank trains. The default backend is nccl when that is a GPU (or, with
    no device given, when CUDA is available), else gloo; with nccl the rank's current CUDA device
    is its training GPU (``LOCAL_RANK`` when none is given), where the collectives' buffers go."""
    if dist.is_initialized():
        return str(dist.get_backend())
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise DpeftError(f"torch.distributed needs {', '.join(missing)} in the environment (torchrun sets them)")
    if backend is None:
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl":
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return backend


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_weighted_sum(
    sums: Sequence[torch.Tensor], weight: float, count: int, extra: Sequence[float] = (), group: Any = None, bucket_bytes: int | None = None
) -> tuple[float, int, list[float]]:
    """All-reduce (SUM) float64 tensors in place plus scalars; returns (total weight, total count, extra sums).

    ``sums`` hold this rank's ``sum_i w_i * delta_i``; after the call every rank holds the sums
    over all ranks. Tensors are packed into buckets of ``bucket_bytes`` (one collective each).
    """
    device = _device()
    scalars = torch.tensor([float(weight), float(count), *map(float, extra)], dtype=torch.float64, device=device)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    per_bucket = max(1, (bucket_bytes or BUCKET_BYTES) // 8)
    bucket: list[torch.Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled
        if not bucket:
            return
        if len(bucket) == 1 and device.type == "cpu" and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat = flat.cpu()
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket, filled = [], 0

    for t in sums:
        if t.dtype != torch.float64:
            raise TypeError("all-reduce buffers must be float64")
        if t.numel() == 0:
            continue
        if filled and filled + t.numel() > per_bucket:
            flush()
        if t.numel() >= per_bucket:  # a big tensor goes alone, in slices
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is None:
                raise ValueError("all-reduce buffers must be contiguous")
            for start in range(0, flat.numel(), per_bucket):
                piece = flat[start : start + per_bucket]
                if device.type == "cpu":
                    dist.all_reduce(piece, op=dist.ReduceOp.SUM, group=group)
                else:
                    on_dev = piece.to(device)
                    dist.all_reduce(on_dev, op=dist.ReduceOp.SUM, group=group)
                    piece.copy_(on_dev.cpu())
            continue
        bucket.append(t)
        filled += t.numel()
    flush()
    values = scalars.cpu().tolist()
    return values[0], int(round(values[1])), values[2:]


def ring_bytes_per_rank(payload_bytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``payload_bytes``."""
    return 0 if world_size <= 1 else int(2 * (world_size - 1) * payload_bytes / world_size)


# ---------------------------------------------------------------- broadcast helpers


def _broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    device = _device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    n = int(size.item())
    if dist.get_rank() == src:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        buf = buf.to(device)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
    if n:
        dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes()


def broadcast_state(state: AdapterState | None, src: int = 0) -> AdapterState:
    """Rank ``src``'s state on every rank (encoded with the dpeft codec, never pickled)."""
    data = None
    if dist.get_rank() == src:
        if state is None:
            raise ValueError(f"rank {src} broadcasts the state and must pass one")
        data = encode_state(state)
    return decode_state(_broadcast_bytes(data, src))
