"""MkDocs hooks (``hooks:`` in mkdocs.yml).

Pages that live outside ``docs/`` join the site without being copied, so the repository keeps
one copy of each: ``benchmarks/RESULTS.md`` (and the plots next to it) becomes
``benchmarks/results.md``, ``CHANGELOG.md`` becomes ``changelog.md`` and
``examples/llm/README.md`` the language-model examples guide. In the API pages, the reST roles
of the docstrings (``:func:`x```) lose their prefix.
"""

from __future__ import annotations

import re
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


#: ``:func:`` and friends in front of a code span, as the docstrings' reST roles render in Markdown
_ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """Drop the reST role prefixes that docstrings carry into the rendered API pages."""
    return _ROLE.sub("", html)
