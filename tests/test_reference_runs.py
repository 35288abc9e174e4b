"""Every execution mode still ends where it ended before: same metrics, same adapter.

``tests/golden/reference_runs.json`` holds, per mode (simulate with the sync, deadline and
async policies, coordinator + worker processes, Ray, all-reduce via simulate and torchrun,
split), the per-round metrics and a fingerprint of the exported adapter of a tiny seeded run,
written by ``scripts/reference_runs.py`` from the commit it names. Each test re-runs one mode
the same way and compares: metrics within 1e-6 (absolute), adapter fingerprints (sum, L2
norm, dot with a seeded random vector, per tensor) within rtol 1e-5 / atol 1e-6.

Every mode gave bit-identical records run to run when the reference was written (checked
with ``--repeat 2``; the async run keeps one task in flight, the deadline run closes at its
quorum, so neither depends on timing), so no comparison is widened. The tiny model is a
seeded random BERT built by the installed torch/transformers: a change of those versions
may legitimately move the numbers (regenerate the reference then, and say so).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((Path(__file__).parent / "golden" / "reference_runs.json").read_text())

pytestmark = pytest.mark.integration


def _load_script():
    spec = importlib.util.spec_from_file_location("reference_runs", ROOT / "scripts" / "reference_runs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference_runs"] = module
    spec.loader.exec_module(module)
    return module


refruns = _load_script()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return refruns.make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.parametrize("mode", sorted(REFERENCE["modes"]))
def test_mode_matches_pre_refactor_reference(mode: str, tiny_bert: Path, tmp_path: Path) -> None:
    if mode == "ray":
        pytest.importorskip("ray")
    assert mode in refruns.MODES, f"mode {mode} is in the reference but scripts/reference_runs.py no longer runs it"
    got = refruns.run_mode(mode, tiny_bert, tmp_path)
    diffs = refruns.compare(mode, REFERENCE["modes"][mode], got)
    assert not diffs, f"{mode} moved from the reference of commit {REFERENCE['commit'][:12]}:\n" + "\n".join(diffs)


def test_compare_names_mode_round_and_tensor() -> None:
    """The comparison itself: a moved loss and a moved tensor are both reported by name."""
    want = REFERENCE["modes"]["simulate"]
    got = json.loads(json.dumps(want))
    got["rounds"][1]["eval_loss"] += 1e-5
    name = sorted(got["adapter"])[0]
    got["adapter"][name]["dot"] *= 1.001
    diffs = refruns.compare("simulate", want, got)
    assert len(diffs) == 2, diffs
    assert diffs[0].startswith("simulate: round 1 eval_loss")
    assert diffs[1].startswith(f"simulate: tensor {name} dot")
    assert refruns.compare("simulate", want, json.loads(json.dumps(want))) == []
