"""`dpeft simulate` with train.lockstep: clients of a worker trained together give the same run.

Two real runs (coordinator + worker processes on loopback gRPC) of the same tiny task, one with
``train.lockstep=true`` and one without, must end with the same global adapter. The comparison
uses SGD (with momentum): the joint pass computes the same math as the clients alone but through
differently shaped matmuls (a wider padded batch, bmm), so gradients agree to fp32 rounding, and
SGD keeps the weights within ~1e-8. With AdamW the same runs differ by ~2e-5: Adam's step
``lr * m / (sqrt(v) + eps)`` turns rounding-level differences of near-zero gradient elements into
visible ones (see tests/train/test_multi_lora.py, exact to 1e-9 in fp64 with AdamW).
Dropout is off on both sides (``model.dropout=0``): one joint pass cannot replay each client's
own dropout masks, so lockstep requires it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from integration_testlib import assert_no_traceback, overrides, read_metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

SAME = dict(
    clients=4,
    clients_per_round=4,
    train__local_steps=3,
    train__optimizer="sgd",
    train__momentum=0.9,
    train__lr=0.5,
    data__max_train_examples=200,
    data__test_examples=32,
    model__max_length=32,
    model__dropout=0,
)


def test_lockstep_run_equals_sequential_run(tmp_path: Path, procs) -> None:
    together, alone = tmp_path / "lockstep", tmp_path / "sequential"
    # started side by side (the two runs share nothing but the machine)
    a = procs.start("simulate", *overrides(together, **SAME, train__lockstep="true"))
    b = procs.start("simulate", *overrides(alone, **SAME, train__lockstep="false"))
    for p in (a, b):
        rc = p.wait(timeout=240)
        assert rc == 0, f"exit {rc}:\n{p.stderr}"
        assert_no_traceback(p.stderr)

    rows_t, rows_a = read_metrics(together), read_metrics(alone)
    assert [r["round"] for r in rows_t] == [r["round"] for r in rows_a] == [0, 1, 2]
    for rt, ra in zip(rows_t[1:], rows_a[1:], strict=True):
        assert rt["clients"] == ra["clients"] == 4
        # every update of the lockstep run was trained together with another client's
        assert rt["lockstep_updates"] == 4, rt
        assert "lockstep_updates" not in ra
        assert abs(rt["train_loss"] - ra["train_loss"]) < 1e-5
        assert rt["bytes_up"] == ra["bytes_up"]

    got = load_file(str(together / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(alone / "adapter" / "adapter_model.safetensors"))
    assert list(got) == list(want)
    # LoRA B factors start at zero: they moved only if the clients trained
    assert max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k) > 1e-3, "the runs did not train"
    for k in want:
        diff = float((got[k] - want[k]).abs().max())
        assert diff <= 1e-5, (k, diff)
