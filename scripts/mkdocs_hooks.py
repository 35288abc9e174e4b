"""MkDocs hooks (``hooks:`` in mkdocs.yml).

Pages that live outside ``docs/`` join the site without being copied, so the repository keeps
one copy of each: ``benchmarks/RESULTS.md`` (and the plots next to it) becomes
``benchmarks/results.md``, ``CHANGELOG.md`` becomes ``changelog.md`` and
``examples/llm/README.md`` the language-model examples guide, the other examples' READMEs
the Examples pages. In the API pages, the reST roles
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
    "examples/custom_strategy/README.md": "examples/custom-strategy.md",
    "examples/custom_dataset/README.md": "examples/custom-dataset.md",
    "examples/edge_tls/README.md": "examples/edge-tls.md",
    "examples/ray/README.md": "examples/ray.md",
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


#: example folder -> its page, for links between examples
_EXAMPLE_PAGES = {
    Path(src).parent.name: Path(uri).name
    for src, uri in PAGES.items()
    if src.startswith("examples/") and uri.startswith("examples/")
}
_LINK = re.compile(r"\]\((\.\./[^)\s#]*)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """An example's README links the repository's way (``../../docs/x.md``, ``../other``); on
    its page in the site the same links must point at the site's pages."""
    if not page.file.src_uri.startswith("examples/"):
        return markdown

    def fix(m: re.Match[str]) -> str:
        target, anchor = m.group(1), m.group(2) or ""
        if target.startswith("../../docs/"):
            return f"](../{target.removeprefix('../../docs/')}{anchor})"
        name = target.removeprefix("../").rstrip("/")
        if name in _EXAMPLE_PAGES:
            return f"]({_EXAMPLE_PAGES[name]}{anchor})"
        return m.group(0)

    return _LINK.sub(fix, markdown)
