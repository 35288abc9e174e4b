"""A tiny `dpeft simulate` with codec.up=int8 sends ~1/3.9 of fp32's bytes and completes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_BIN = Path(sys.executable).parent / "dpeft"
DPEFT = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "dpeft_launch.cli"]
TINY = [
    "rounds=2",
    "clients=4",
    "clients_per_round=2",
    "train.local_steps=5",
    "data.max_train_examples=300",
    "data.test_examples=64",
    "data.partition=iid",
]


def _simulate(run: Path, *extra: str) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([*DPEFT, "simulate", "--fresh", f"run_dir={run}", *TINY, *extra], capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@functools.cache
def _adapter_state():
    from dpeft.adapters import build_model, extract_state
    from dpeft.config import AdapterConfig, ModelConfig

    return extract_state(build_model(ModelConfig(), AdapterConfig(), 2, 0).model)


def _payload_sizes(round_num: int, client_id: int) -> tuple[int, int]:
    """(fp32, int8) upload bytes of one client's update (sizes do not depend on the values)."""
    from collections import OrderedDict

    import torch

    from dpeft.codec import encode_state
    from dpeft.codec.updates import RunCodecs, make_codec
    from dpeft.state import AdapterState

    state = _adapter_state()
    delta = AdapterState(OrderedDict((k, torch.zeros_like(v)) for k, v in state.items()), {"round": round_num, "client_id": client_id, "kind": "delta"})
    rc = RunCodecs(make_codec("int8"), make_codec("fp32"), error_feedback=False)
    return len(encode_state(delta)), len(rc.encode_update(client_id, delta))


def test_int8_uploads_are_a_quarter_of_fp32(tmp_path: Path) -> None:
    rows = _simulate(tmp_path / "int8", "codec.up=int8")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 2 and r["rejected"] == 0
        sizes = [_payload_sizes(r["round"], c) for c in r["sampled"]]
        fp32 = sum(a for a, _ in sizes)
        assert r["bytes_up"] == sum(b for _, b in sizes)  # exact: measured on the wire
        assert 3.9 <= fp32 / r["bytes_up"] <= 4.0, (fp32, r["bytes_up"])
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)  # accuracy vs fp32: benchmarks/codecs.py
    # error feedback kept one residual file per trained client on the worker side
    trained = {c for r in rows[1:] for c in r["sampled"]}
    assert len(list((tmp_path / "int8" / "residuals").glob("c-*.safetensors"))) == len(trained)
