"""Report strongly connected components (import cycles) among the dpeft modules.

Every file under dpeft/ is parsed with ast; module-level and function-level imports of
``dpeft.*`` count as edges. Exit 1 when a cycle of more than one module exists.
Usage: python scripts/import_cycles.py [package_dir]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, is_package: bool, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module prefix of t
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in modules:
                    out.add(cand)
                    break
    out.discard(name)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def import_cycles(root: Path) -> tuple[int, list[list[str]]]:
    """(number of modules, the import cycles among them, largest first) of the package at ``root``."""
    files = {module_name(root, p): p for p in root.rglob("*.py") if "_proto" not in p.parts}
    modules = set(files)
    graph = {m: imports_of(p, m, p.name == "__init__.py", modules) for m, p in files.items()}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    return len(files), sorted(cycles, key=len, reverse=True)


def main() -> int:
    count, cycles = import_cycles(Path(sys.argv[1] if len(sys.argv) > 1 else "dpeft").resolve())
    for c in cycles:
        print(f"cycle of {len(c)} modules: {' '.join(c)}")
    print(f"{count} modules, {len(cycles)} cycle(s)")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
