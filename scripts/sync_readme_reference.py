"""Replace the README's config reference table with ``python -m dpeft.config``'s output.

Run after adding or changing a config key: ``python scripts/sync_readme_reference.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpeft.validate import reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    table = reference_markdown().strip() + "\n"
    start = text.find("## Config reference")
    pattern = re.compile(r"^\| key \| default \| meaning \|\n\| --- \| --- \| --- \|\n(?:\|.*\|\n)+", re.M)
    head, tail = text[:start], text[start:]
    tail, n = pattern.subn(lambda _m: table, tail, count=1)
    new = head + tail
    if start < 0 or n != 1:
        raise SystemExit("README.md has no config reference table to replace")
    README.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
