"""MkDocs hook: pages that live outside ``docs/`` join the site without being copied.

``benchmarks/RESULTS.md`` (and the plots next to it) become ``benchmarks/results.md``, and
``CHANGELOG.md`` becomes ``changelog.md`` and ``examples/llm/README.md`` the language-model
examples guide, so the repository keeps one copy of each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

#: repository file -> where it appears in the site
PAGES = {
    "benchmarks/RESULTS.md": "benchmarks/results.md",
    "CHANGELOG.md": "changelog.md",
    "examples/llm/README.md": "guides/llm-examples.md",
}
#: files next to RESULTS.md that its pages link to
ASSET_SUFFIXES = (".png", ".svg")


def on_files(files: Files, config: Any) -> Files:
    """Add the outside pages and the benchmark plots as generated files."""
    for source, uri in PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    for asset in sorted((ROOT / "benchmarks").iterdir()):
        if asset.suffix in ASSET_SUFFIXES:
            files.append(File.generated(config, f"benchmarks/{asset.name}", abs_src_path=str(asset)))
    return files
