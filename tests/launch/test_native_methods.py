"""A dpeft-native method through a real `dpeft simulate` run (coordinator + worker processes):
the exported adapter loads with one line and gives the checkpointed global's logits, and the
global's R is orthonormal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from integration_testlib import SAMPLE_TEXTS, SHORT, assert_no_traceback, minilm_dir, overrides, read_metrics

pytestmark = pytest.mark.integration


def test_loreft_simulate_exports_a_loadable_adapter(tmp_path: Path, procs) -> None:
    from transformers import AutoModelForSequenceClassification

    from dpeft.adapters import build_model, load_adapter, load_state
    from dpeft.rounds.checkpoint import latest_checkpoint
    from dpeft.validate import load_config

    run = tmp_path / "run"
    args = overrides(
        run,
        adapter__method="loreft",
        adapter__r=4,
        rounds=1,
        simulate__processes=1,
        train__local_steps=3,
        data__max_train_examples=64,
        data__test_examples=32,
        **SHORT,
    )
    rc, p = procs.run("simulate", *args, "adapter.options={positions: f1+l1}", timeout=180)
    assert rc == 0, p.stderr
    assert_no_traceback(p.stderr)
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2
    assert sorted(path.name for path in (run / "adapter").iterdir()) == ["adapter_model.safetensors", "dpeft_adapter.json", "labels.json"]

    found = latest_checkpoint(run / "checkpoints")
    assert found is not None
    _, state, _, _ = found
    for key, r in state.items():
        if key.endswith(".R"):
            assert torch.allclose(r.double() @ r.double().T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    cfg = load_config(run / "config.yaml")
    ours = build_model(cfg.model, cfg.adapter, 2, cfg.seed)
    load_state(ours.model, state)
    ours.model.eval()
    torch.manual_seed(1234)
    loaded = load_adapter(AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2), run / "adapter")
    batch = ours.tokenizer(SAMPLE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ours.model(**batch).logits, atol=1e-5)
