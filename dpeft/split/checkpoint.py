"""Split-mode checkpoints: the cloud's federation state and each edge's private training state.

Both use :mod:`dpeft.rounds.checkpoint` (one safetensors file per round, written to a temp
file, fsynced and renamed; a sha256 over the tensors; an unreadable newest file falls back to
the previous one; the newest 3 are kept).

- Cloud, ``<run_dir>/checkpoints/round-NNNNNN.safetensors``, written when round N closes: the
  global adapter, the strategy's state, the round, the edge registry (edge id -> client id)
  and the round's metrics line (written again on resume if the crash came before it).
- Edge, ``<state dir>/round-NNNNNN.safetensors``, written after the edge's local training of
  round N and *before* it sends its update, so whenever the cloud has closed round N every
  edge that trained in it has its state of round N on disk: what only the edge owns, the
  optimizer state, Kill-and-Revive (active set, window snapshots, last scores), the step count
  and torch's RNG, plus the edge's local adapter of that round. The factors an edge resumes
  with are the global's (``strategy.client_state``), as after any round.

A resumed edge of round N loads its newest state of a round <= N (an edge not sampled in the
last rounds did not change since it last trained).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from dpeft.rounds.checkpoint import clear_checkpoints, latest_checkpoint, save_checkpoint

log = logging.getLogger("dpeft.split")

EDGE_STATE_VERSION = 1


def edge_training_state(edge) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able info) of an :class:`~dpeft.split.edge.EdgeModel`'s private training state."""
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd = edge.optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt/{pid}/{name}"] = value
            else:
                scalars[f"{pid}/{name}"] = value
    kr_tensors, kr_info = edge.kr.state_dict()
    for name, t in kr_tensors.items():
        tensors[f"kr/{name}"] = t
    tensors["rng/torch"] = torch.get_rng_state()
    info = {
        "version": EDGE_STATE_VERSION,
        "step_count": edge.step_count,
        "modules": edge.keys,
        "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
        "kr": kr_info,
    }
    return tensors, info


def load_edge_training_state(edge, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Restore :func:`edge_training_state` into ``edge`` (its factors are loaded separately)."""
    if info.get("version") != EDGE_STATE_VERSION or list(info.get("modules", [])) != edge.keys:
        raise ValueError("the saved edge state is for another model or adapter")
    state: dict[int, dict[str, Any]] = {}
    kr: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("opt/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = t
        elif name.startswith("kr/"):
            kr[name[3:]] = t
    for name, value in info["optimizer"]["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    edge.optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})
    edge.kr.load_state_dict(kr, info["kr"])
    edge.step_count = int(info["step_count"])
    torch.set_rng_state(tensors["rng/torch"])


def save_edge_state(directory: Path, round_num: int, edge) -> Path:
    """Write the edge's training state after its local training of ``round_num``."""
    tensors, info = edge_training_state(edge)
    return save_checkpoint(directory, round_num, edge.state(), tensors, info)


def restore_edge_state(directory: Path, round_num: int, edge) -> int | None:
    """Load the newest saved state of a round <= ``round_num``; returns its round (None: none found)."""
    found = latest_checkpoint(directory, max_round=round_num)
    if found is None:
        return None
    saved_round, _local, tensors, info = found
    load_edge_training_state(edge, tensors, info)
    return saved_round


def clear_edge_state(directory: Path) -> None:
    """A fresh run: forget the states of an earlier run in ``directory`` (only dpeft's own files)."""
    clear_checkpoints(directory)


__all__ = [
    "clear_edge_state",
    "edge_training_state",
    "load_edge_training_state",
    "restore_edge_state",
    "save_edge_state",
]
