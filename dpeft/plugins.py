"""Plug-ins: user modules that register strategies, sync policies, codecs, dataset loaders and local losses.

A plug-in is an ordinary Python module whose import registers implementations with the
decorators of each family (:func:`~dpeft.strategies.base.register_strategy`,
:func:`~dpeft.sync.base.register_policy`, :func:`~dpeft.codec.updates.registry.register_codec`,
:func:`~dpeft.data.loaders.register_dataset`, :func:`~dpeft.train.losses.register_loss`). A run
selects them by name in its config, exactly like the built-ins.

Plug-ins are imported:

- from the config's ``plugins:`` list (modules on PYTHONPATH, next to the config file or in the
  current directory; a directory found that way is added to PYTHONPATH for the worker processes) (``plugins: [my_module]``, ``--plugin my_module`` on the
  command line), whenever a config is loaded: by the coordinator, and again by every worker that
  receives the config (spawned simulate workers, edge workers, Ray actors), before the config's
  names are checked;
- from the Python entry point group ``dpeft.plugins`` of installed distributions
  (``[project.entry-points."dpeft.plugins"] my_plugin = "my_package.dpeft_plugin"``), once per process.

A module that cannot be imported is a config error naming ``plugins`` (exit 2).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from dpeft.errors import ConfigError

#: entry point group whose modules every process imports before it reads a config
ENTRY_POINT_GROUP = "dpeft.plugins"

_entry_points_loaded = False


def plugin_names(value: Any, key: str = "plugins") -> list[str]:
    """The module names of a config's ``plugins`` value (a list of names, one name, or null)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(key, f"must be a list of importable module names, got {value!r}")
    return [v.strip() for v in value]


def _find_in(name: str, dirs: Iterable[str]) -> str | None:
    """The first of ``dirs`` holding top-level module or package ``name``."""
    top = name.split(".")[0]
    for d in dirs:
        if d and (Path(d, f"{top}.py").is_file() or Path(d, top, "__init__.py").is_file()):
            return str(Path(d).resolve())
    return None


def _add_search_dir(directory: str) -> None:
    """Put ``directory`` on this process's sys.path and on PYTHONPATH (inherited by the worker
    processes it starts: spawned simulate workers, all-reduce ranks, a local Ray)."""
    sys.path.append(directory)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if directory not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([*parts, directory])


def import_plugin(name: str, key: str = "plugins", search: Iterable[str] = ()) -> None:
    """Import plug-in module ``name`` (a no-op when it already is); a config error naming ``key`` if it cannot be.

    Looked up on sys.path, then in ``search`` (the config file's directory) and the current
    directory; a module found in one of those puts its directory on sys.path and PYTHONPATH."""
    if name in sys.modules:
        return
    try:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            found = _find_in(name, [*search, os.getcwd()]) if exc.name == name.split(".")[0] else None
            if found is None:
                raise
            _add_search_dir(found)
            importlib.import_module(name)
    except ConfigError:
        raise
    except ImportError as exc:
        missing = f" (no module named {exc.name!r})" if exc.name else ""
        raise ConfigError(
            key, f"cannot import plug-in module {name!r}{missing}; put it on PYTHONPATH, next to the config file, or install it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken plug-in: one line naming it, not a traceback
        raise ConfigError(key, f"plug-in module {name!r} failed to import: {type(exc).__name__}: {exc}") from None


def plugin_dirs(modules: Iterable[str]) -> list[str]:
    """The sys.path entries the imported plug-in ``modules`` came from (for another process's PYTHONPATH)."""
    dirs: list[str] = []
    for name in modules:
        file = getattr(sys.modules.get(name), "__file__", None)
        if not file:
            continue
        top = Path(file).resolve().parent
        for _ in range(name.count(".") + (Path(file).name == "__init__.py")):
            top = top.parent
        if str(top) not in dirs:
            dirs.append(str(top))
    return dirs


def load_entry_points() -> list[str]:
    """Import every module of the ``dpeft.plugins`` entry point group (once per process); their names."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    names = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - one line naming the entry point
            raise ConfigError(
                "plugins",
                f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP} failed to load: {type(exc).__name__}: {exc}",
            ) from None
        names.append(ep.value)
    return names


def load_plugins(modules: Iterable[str] = (), *, entry_points: bool = True, search: Iterable[str] = ()) -> None:
    """Import the ``dpeft.plugins`` entry points (when ``entry_points``) and the named plug-in
    modules (looked up on sys.path, then in ``search`` and the current directory)."""
    if entry_points:
        load_entry_points()
    search = list(search)
    for name in modules:
        import_plugin(name, search=search)


def replaces_same_definition(old: object, new: object) -> bool:
    """Whether ``new`` is the same definition as the registered ``old`` run again (a reloaded
    module, a notebook cell executed twice): same module and qualified name. Registries accept
    that as a replacement and refuse any other second registration of a name."""
    return (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
        getattr(new, "__module__", None),
        getattr(new, "__qualname__", None),
    )


__all__ = [
    "ENTRY_POINT_GROUP",
    "import_plugin",
    "plugin_dirs",
    "load_entry_points",
    "load_plugins",
    "plugin_names",
    "replaces_same_definition",
]


# -- the dataset-loader registry (data.dataset: <name>); dpeft.data.loaders re-exports it --------


@dataclass(kw_only=True)
class NoDatasetOptions:
    """A loader that reads no options."""


#: loader(data config, parsed options) -> all examples, or (train, test or None)
DatasetLoader = Callable[..., Any]


class RegisteredDataset(NamedTuple):
    """A registered dataset loader and the options dataclass ``data.options`` is parsed into."""

    loader: DatasetLoader
    options: type


_DATASETS: dict[str, RegisteredDataset] = {}
#: names the config schema reserves (built-in corpora and files)
RESERVED_DATASETS = ("rotten_tomatoes", "reuters_r8", "file", "hf")


def register_dataset(name: str, options: type = NoDatasetOptions) -> Callable[[DatasetLoader], DatasetLoader]:
    """Function decorator registering a dataset loader as ``data.dataset: <name>``."""
    if not name or name != name.strip().lower() or name in RESERVED_DATASETS:
        raise ValueError(f"bad dataset loader name {name!r} (lowercase, not one of {', '.join(RESERVED_DATASETS)})")

    def wrap(fn: DatasetLoader) -> DatasetLoader:
        old = _DATASETS.get(name)
        if old is not None and not replaces_same_definition(old.loader, fn):
            raise ValueError(f"dataset loader {name!r} registered twice")
        _DATASETS[name] = RegisteredDataset(fn, options)
        return fn

    return wrap


def registered_datasets() -> dict[str, RegisteredDataset]:
    """Name -> (loader, options dataclass) of every registered plug-in dataset loader."""
    return dict(_DATASETS)
