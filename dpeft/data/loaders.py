"""Registry of plug-in dataset loaders: ``data.dataset: <name>`` reads examples from user code.

A loader is a function registered with :func:`register_dataset` and, optionally, a typed options
dataclass (fields made with :func:`dpeft.config.options.option`) that ``data.options`` is parsed
into, with the same checks and error messages as the built-in families' options::

    @dataclass(kw_only=True)
    class ToyOptions:
        size: int = option(200, "examples to generate", low=1)

    @register_dataset("toy", options=ToyOptions)
    def toy(cfg: DataConfig, opts: ToyOptions) -> TextDataset:
        ...

It returns the whole example set (a :class:`~dpeft.data.datasets.TextDataset`), or a pair
(train, test) when the data has its own held-out split (test may be None). dpeft then does what it
does for every source: holds out ``data.test_examples`` when there is no test split, applies
``data.max_train_examples`` and splits the examples among the clients (``data.partition``).

What the loader returns must match ``data.format`` (auto: classification for ``model.task=seq_cls``,
text for ``causal_lm``): texts with labels and label names for classification; texts for text;
prompts in ``texts`` and answers in ``responses`` for instruction data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpeft.config.options import parse_options
from dpeft.errors import ConfigError, DataError
from dpeft.plugins import _DATASETS as _REGISTRY
from dpeft.plugins import (
    NoDatasetOptions,
    RegisteredDataset,
    register_dataset,
    registered_datasets,
)

if TYPE_CHECKING:
    from dpeft.config import DataConfig
    from dpeft.data.datasets import TextDataset


def dataset_options(cfg: DataConfig) -> Any:
    """``data.options`` parsed by the loader's options dataclass (errors name ``data.options.<key>``)."""
    entry = _REGISTRY[cfg.dataset]
    return parse_options(entry.options, cfg.options, "data.options", f"dataset loader {cfg.dataset!r}")


def validate_dataset_options(cfg: DataConfig) -> None:
    """``data.options``: parsed by a plug-in loader's options; refused for the built-in sources."""
    if cfg.dataset in _REGISTRY:
        dataset_options(cfg)
    elif cfg.options:
        raise ConfigError(
            "data.options", f"is read only by a plug-in dataset loader, and data.dataset is {cfg.dataset}; remove it"
        )


def load_registered(cfg: DataConfig) -> tuple[TextDataset, TextDataset | None]:
    """(all or train examples, test examples or None) from the loader ``data.dataset`` names."""
    from dpeft.data.datasets import TextDataset

    out = _REGISTRY[cfg.dataset].loader(cfg, dataset_options(cfg))
    train, test = out if isinstance(out, tuple) else (out, None)
    for what, value in (("its examples", train), ("its test split", test)):
        if value is None and what == "its test split":
            continue
        if not isinstance(value, TextDataset):
            raise DataError(
                f"dataset loader {cfg.dataset!r} returned {type(value).__name__} as {what}; return a dpeft TextDataset (or a (train, test) pair)"
            )
        if len(value.texts) != len(value.labels):
            raise DataError(
                f"dataset loader {cfg.dataset!r}: {what} have {len(value.texts)} texts but {len(value.labels)} labels"
            )
    return train, test


__all__ = [
    "NoDatasetOptions",
    "RegisteredDataset",
    "dataset_options",
    "load_registered",
    "register_dataset",
    "registered_datasets",
    "validate_dataset_options",
]
