"""Checkpoints on disk that went bad: truncated or bit-flipped newest -> the previous good one, with a warning."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from dpeft.rounds.checkpoint import latest_checkpoint, save_checkpoint
from dpeft.state import AdapterState


def _save(d: Path, r: int) -> None:
    state = AdapterState(OrderedDict(w=torch.full((64, 8), float(r))), {"round": r})
    save_checkpoint(d, r, state, {"m": torch.full((3,), float(r))}, {"seed": 1})


def test_truncated_newest_falls_back_with_a_warning(tmp_path: Path, caplog) -> None:
    for r in (1, 2, 3):
        _save(tmp_path, r)
    newest = tmp_path / "round-000003.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="dpeft.checkpoint"):
        found = latest_checkpoint(tmp_path)
    assert found is not None
    round_num, glob, strat, info = found
    assert round_num == 2 and float(glob["w"][0, 0]) == 2.0 and float(strat["m"][0]) == 2.0 and info["seed"] == 1
    assert any("round-000003" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_bit_flip_in_tensor_data_is_detected(tmp_path: Path, caplog) -> None:
    for r in (1, 2):
        _save(tmp_path, r)
    newest = tmp_path / "round-000002.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0x01  # inside the tensor bytes: the container still parses
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dpeft.checkpoint"):
        found = latest_checkpoint(tmp_path)
    assert found is not None and found[0] == 1
    assert any("sha256" in r.getMessage() for r in caplog.records)


def test_all_unreadable_means_fresh_start(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / "round-000001.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) is None
