"""A run's data, the one way every mode gets it: load, split among clients, tokenize.

:func:`load_run_data` reads the configured dataset in its format and partitions the training
examples among clients; :func:`tokenize_dataset` turns any of its datasets into tensors for the
run's model (classification labels, or token-level targets for causal LMs). Simulate, the
coordinator, workers, all-reduce and split mode all go through these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpeft.config import RunConfig
from dpeft.config.data_checks import resolve_format, resolve_partition
from dpeft.data.datasets import TextDataset, label_names_of, load_dataset, load_text_file
from dpeft.data.lazy import LazyTokens
from dpeft.data.partition import column_partition, partition
from dpeft.data.tokenize import TokenizedData, tokenize, tokenize_pairs, tokenize_text_lm
from dpeft.errors import ConfigError, DataError


def _needs_tokenizer(cfg: RunConfig) -> bool:
    return resolve_format(cfg) == "chat"


def _tokenizer(cfg: RunConfig, tokenizer: Any) -> Any:
    if tokenizer is None and _needs_tokenizer(cfg):
        from dpeft.adapters.model import load_tokenizer

        return load_tokenizer(cfg.model)
    return tokenizer


@dataclass
class RunData:
    """The run's training and held-out examples, and each client's training indices."""

    train: TextDataset
    test: TextDataset
    partitions: list[list[int]]
    format: str

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names

    @property
    def num_labels(self) -> int | None:
        """Classes of the classification head (None when there is none: causal LMs)."""
        return len(self.train.label_names) if self.format == "classification" else None


def split_among(cfg: RunConfig, train: TextDataset, n_clients: int) -> list[list[int]]:
    """Each client's training indices, by the resolved ``data.partition``."""
    method = resolve_partition(cfg)
    if method == "column":
        if train.groups is None:
            raise ConfigError(
                "data.partition_column", "data.partition=column needs data.partition_column (a column of the data file)"
            )
        return column_partition(train.groups, n_clients, cfg.seed)
    return partition(train.labels, n_clients, method, cfg.seed, cfg.data.dirichlet_alpha, cfg.data.min_examples_per_client)


def load_run_data(cfg: RunConfig, n_clients: int | None = None, tokenizer: Any = None) -> RunData:
    """Load the configured data and split it among ``n_clients`` (default: ``cfg.clients``).

    ``tokenizer``: the model's, for chat data (loaded from ``model`` when not given).
    Bad rows raise DataError, a split that cannot be made ConfigError (both exit 2).
    """
    fmt = resolve_format(cfg)
    train, test = load_dataset(
        cfg.data, cfg.seed, need_labels=fmt == "classification", fmt=fmt, tokenizer=_tokenizer(cfg, tokenizer)
    )
    parts = split_among(cfg, train, cfg.clients if n_clients is None else n_clients)
    return RunData(train, test, parts, fmt)


def load_client_file(cfg: RunConfig, path: str | Path, label_names: list[str] | None, tokenizer: Any = None) -> TextDataset:
    """One client's own data file (``dpeft worker --data``), read in the run's format.

    ``label_names``: the run's classes (a row's label must be one of them); None when the run has
    no classes to match (its file labels are kept as found).
    """
    from dpeft.data.instruct import instruction_file_as_client

    fmt = resolve_format(cfg)
    if fmt in ("instruction", "chat"):
        names = label_names if cfg.data.label_column else [""]
        return instruction_file_as_client(cfg.data, path, fmt, _tokenizer(cfg, tokenizer), names or [""])
    label_col = (cfg.data.label_column or "label") if fmt == "classification" else None
    pairs = load_text_file(path, cfg.data.text_column, label_col)
    if label_col is None:
        return TextDataset([t for t, _ in pairs], [0] * len(pairs), [""])
    names = label_names if label_names is not None else label_names_of({lab for _, lab in pairs})
    index = {n: i for i, n in enumerate(names)}
    bad = sorted({lab for _, lab in pairs if lab not in index})
    if bad:
        raise DataError(f"{path}: labels {bad[:5]} are not among the run's labels {names}")
    return TextDataset([t for t, _ in pairs], [index[lab] for _, lab in pairs], names)


def tokenize_dataset(tokenizer: Any, data: TextDataset, cfg: RunConfig, lazy: bool = False) -> TokenizedData | LazyTokens:
    """Tensors of ``data`` for the run's model.

    seq_cls: class labels. causal_lm: token targets, -100 on padding and (instruction/chat) on the
    prompt, except a chat's earlier assistant turns; plain text is trained on every token.
    ``lazy``: rows are tokenized when first used (:class:`~dpeft.data.lazy.LazyTokens`; the same
    tensors), so a process tokenizes only the clients it trains.
    """
    if lazy:
        labels = torch.tensor(data.labels, dtype=torch.long) if cfg.model.task == "seq_cls" else None
        return LazyTokens(len(data), cfg.model.max_length, lambda idx: _tokenized(tokenizer, data.subset(idx), cfg), labels)
    return _tokenized(tokenizer, data, cfg)


def _tokenized(tokenizer: Any, data: TextDataset, cfg: RunConfig) -> TokenizedData:
    if cfg.model.task == "seq_cls":
        return tokenize(tokenizer, data.texts, data.labels, cfg.model.max_length)
    if data.responses is None:
        return tokenize_text_lm(tokenizer, data.texts, cfg.model.max_length)
    chat = resolve_format(cfg) == "chat"
    return tokenize_pairs(
        tokenizer, data.texts, data.responses, cfg.model.max_length, special_prefix=not chat, prompt_targets=data.prompt_targets
    )
