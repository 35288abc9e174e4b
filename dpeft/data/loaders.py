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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from dpeft.config.options import parse_options
from dpeft.errors import ConfigError, DataError
from dpeft.plugins import replaces_same_definition

if TYPE_CHECKING:
    from dpeft.config import DataConfig
    from dpeft.data.datasets import TextDataset


@dataclass(kw_only=True)
class NoDatasetOptions:
    """A loader that reads no options."""


#: loader(data config, parsed options) -> all examples, or (train, test or None)
DatasetLoader = Callable[..., Any]


class RegisteredDataset(NamedTuple):
    """A registered dataset loader and the options dataclass ``data.options`` is parsed into."""

    loader: DatasetLoader
    options: type


_REGISTRY: dict[str, RegisteredDataset] = {}
#: names the config schema reserves (built-in corpora and files)
RESERVED = ("rotten_tomatoes", "reuters_r8", "file")


def register_dataset(name: str, options: type = NoDatasetOptions) -> Callable[[DatasetLoader], DatasetLoader]:
    """Function decorator registering a dataset loader as ``data.dataset: <name>``."""
    if not name or name != name.strip().lower() or name in RESERVED:
        raise ValueError(f"bad dataset loader name {name!r} (lowercase, not one of {', '.join(RESERVED)})")

    def wrap(fn: DatasetLoader) -> DatasetLoader:
        old = _REGISTRY.get(name)
        if old is not None and not replaces_same_definition(old.loader, fn):
            raise ValueError(f"dataset loader {name!r} registered twice")
        _REGISTRY[name] = RegisteredDataset(fn, options)
        return fn

    return wrap


def registered_datasets() -> dict[str, RegisteredDataset]:
    """Name -> (loader, options dataclass) of every registered plug-in dataset loader."""
    return dict(_REGISTRY)


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
