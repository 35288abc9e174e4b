"""Helpers shared by the benchmarks: machine note and marker-delimited sections of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_note() -> str:
    """One line describing the machine the numbers were taken on."""
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:  # pragma: no cover
        mem = "RAM unknown"
    cpu = platform.processor() or platform.machine()
    import torch

    return f"Machine: {os.cpu_count()} cores ({cpu}), {mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, no GPU."


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- key -->`` and ``<!-- /key -->``."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is written by the script it names; ratios compare runs made in the same invocation.\n"
    )
    block = f"<!-- {key} -->\n## {title}\n\n{body.strip()}\n<!-- /{key} -->"
    pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
