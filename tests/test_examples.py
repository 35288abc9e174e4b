"""Every example config under examples/ loads and validates (an unknown key, a wrong type or an
impossible value in a shipped example fails here, not on a user's machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpeft.validate import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.rglob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.relative_to(EXAMPLES).as_posix() for p in FILES}
    assert {"llm/smollm2-cpu.yaml", "llm/smollm2-gpu.yaml", "llm/ray-qlora.yaml", "llm/llama-7b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(EXAMPLES).as_posix() for p in FILES])
def test_example_config_loads(path: Path) -> None:
    cfg = load_config(path)
    if "llm" in path.parts:
        assert cfg.model.task == "causal_lm"
        assert cfg.data.format in ("instruction", "chat")
