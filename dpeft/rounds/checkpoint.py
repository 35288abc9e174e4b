"""Atomic checkpoints: the global adapter, strategy state and bookkeeping of a finished round.

Each checkpoint is one safetensors file (tensors prefixed ``global/`` and ``strategy/``) with
a JSON metadata entry; it is written to a temp file, fsynced and renamed, so a crash never
leaves a half-written checkpoint under the final name. ``latest`` falls back to the previous
checkpoint when the newest is unreadable.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from dpeft.codec.tensors import Limits, decode_state, iter_encoded
from dpeft.fsutil import atomic_write
from dpeft.state import AdapterState

log = logging.getLogger("dpeft.checkpoint")


def _digest(tensors: OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (detects bit rot the container format misses)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy (multi-GiB adapters)
    return h.hexdigest()


def save_checkpoint(
    directory: Path, round_num: int, global_state: AdapterState, strategy_state: dict[str, torch.Tensor], info: dict[str, Any], keep: int = 3
) -> Path:
    """Write ``round-NNNNNN.safetensors``; keep the newest ``keep`` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in global_state.items():
        tensors[f"global/{k}"] = v
    for k, v in strategy_state.items():
        tensors[f"strategy/{k}"] = v
    meta = {"round": round_num, "global_meta": global_state.meta, "info": info, "sha256": _digest(tensors)}
    path = directory / f"round-{round_num:06d}.safetensors"
    atomic_write(path, iter_encoded(AdapterState(tensors, meta)))
    for old in sorted(directory.glob("round-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def clear_checkpoints(directory: Path) -> int:
    """A run that starts over: delete the ``round-*`` checkpoints of an earlier run in ``directory``.

    Left in place they would outrank the new run's checkpoints on resume and be kept over them
    by the keep-N pruning. Only dpeft's own files are touched; returns how many were removed.
    """
    removed = 0
    if directory.is_dir():
        for path in directory.glob("round-*.safetensors"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def load_checkpoint(path: Path) -> tuple[int, AdapterState, dict[str, torch.Tensor], dict[str, Any]]:
    """(round, global state, strategy state, info) from one checkpoint file."""
    state = decode_state(path.read_bytes(), limits=Limits(max_total_bytes=1 << 40))
    meta = state.meta
    if "round" not in meta:
        raise ValueError(f"{path} is not a dpeft checkpoint")
    if "sha256" in meta and meta["sha256"] != _digest(state.tensors):
        raise ValueError(f"{path}: tensor data does not match its recorded sha256 (corrupted on disk)")
    glob = AdapterState(OrderedDict((k[len("global/") :], v) for k, v in state.items() if k.startswith("global/")), meta.get("global_meta", {}))
    strat = {k[len("strategy/") :]: v for k, v in state.items() if k.startswith("strategy/")}
    return int(meta["round"]), glob, strat, meta.get("info", {})


def latest_checkpoint(
    directory: Path, max_round: int | None = None
) -> tuple[int, AdapterState, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest readable checkpoint (of a round <= ``max_round`` if given), skipping (with a warning) any that is corrupt."""
    for path in sorted(directory.glob("round-*.safetensors"), reverse=True):
        if max_round is not None:
            digits = path.stem[len("round-") :]
            if not digits.isdigit() or int(digits) > max_round:
                continue
        try:
            return load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any corruption means: try the previous one
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None
