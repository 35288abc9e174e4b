"""The config, its families (strategies, sync policies, codecs) and the validation above them
import one another in one direction only: no import cycle (module- or function-level) holds them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERED = ("dpeft.config", "dpeft.validate", "dpeft.strategies", "dpeft.sync", "dpeft.codec", "dpeft.adapters", "dpeft.split.config")


def _cycles() -> list[list[str]]:
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_cycles(ROOT / "dpeft")[1]


def test_config_and_families_are_in_no_import_cycle() -> None:
    caught = [c for c in _cycles() if any(m == p or m.startswith(p + ".") for m in c for p in LAYERED)]
    assert not caught, f"import cycles through the config layers: {caught}"
