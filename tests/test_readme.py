"""The README documents every config key and keeps the two-command quick start."""

from __future__ import annotations

import re
from pathlib import Path

from dpeft.validate import reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_config_key_is_documented() -> None:
    text = README.read_text()
    keys = re.findall(r"^\| `([^`]+)` \|", reference_markdown(), flags=re.M)
    assert len(keys) > 30
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"README config reference lacks {missing}; paste `python -m dpeft.config`"


def test_quick_start_is_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
