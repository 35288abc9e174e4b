"""The README stays a one-screen quick start, and the documentation site stays whole.

The config reference lives in ``docs/reference/config.md``, generated from the config code by
``scripts/sync_config_reference.py``; the site's pages are listed in ``mkdocs.yml``. ``make docs``
builds the site in strict mode (CI); these checks run without MkDocs installed.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

from dpeft.validate import reference_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "reference" / "config.md"
#: pages the site adds from elsewhere in the repository (scripts/mkdocs_hooks.py)
GENERATED = {
    "benchmarks/results.md",
    "changelog.md",
    "guides/llm-examples.md",
    "examples/custom-strategy.md",
    "examples/custom-dataset.md",
    "examples/edge-tls.md",
    "examples/ray.md",
}


def test_quick_start_is_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("##", 1)[0]
    block = re.search(r"```\n(.*?)```", section, flags=re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make run", "make test"]


def test_readme_fits_on_a_screen_or_two() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_readme_links_resolve() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links into the documentation"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_config_reference_page_is_current() -> None:
    render = runpy.run_path(str(ROOT / "scripts" / "sync_config_reference.py"))["render"]
    assert CONFIG_PAGE.read_text(encoding="utf-8") == render(), "run `python scripts/sync_config_reference.py`"


def test_every_config_key_is_documented() -> None:
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    keys = re.findall(r"^\| `([^`]+)` \|", reference_markdown(builtin_only=True), flags=re.M)
    assert len(keys) > 30
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"docs/reference/config.md lacks {missing}; run `python scripts/sync_config_reference.py`"


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


class _MkdocsLoader(yaml.SafeLoader):
    """mkdocs.yml may hold tags such as ``!!python/name:`` or ``!ENV``: read them as nothing."""


_MkdocsLoader.add_multi_constructor("", lambda _loader, _suffix, _node: None)


def test_every_page_is_in_the_navigation_and_exists() -> None:
    nav = _nav_pages(yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_MkdocsLoader)["nav"])
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not (on_disk - set(nav)), f"pages missing from mkdocs.yml nav: {sorted(on_disk - set(nav))}"
    dangling = set(nav) - on_disk - GENERATED
    assert not dangling, f"mkdocs.yml nav names pages that do not exist: {sorted(dangling)}"


def test_documentation_speaks_to_users() -> None:
    """No page talks about how dpeft is being developed."""
    pages = [
        README,
        ROOT / "CHANGELOG.md",
        ROOT / "benchmarks" / "RESULTS.md",
        ROOT / "examples" / "llm" / "README.md",
        *DOCS.rglob("*.md"),
    ]
    banned = re.compile(r"\b(helpers?|whoever picks up|where the targets stand|TODO|FIXME)\b", re.I)
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages for m in banned.finditer(p.read_text(encoding="utf-8"))]
    assert not hits, hits
