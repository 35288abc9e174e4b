"""Reading a run config: YAML file plus ``key=value`` overrides, type-checked into the schema.

:func:`build_config` checks types and the cross-field rules of the core sections
(:mod:`dpeft.config.checks`); the sections owned by registered families (strategies, sync
policies, codecs, adapter methods) are checked by :func:`dpeft.validate.load_config`, which is
what commands call. Errors raise :class:`~dpeft.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpeft.config.checks import check_core
from dpeft.config.schema import RunConfig
from dpeft.errors import ConfigError

#: a top-level section given a single word means this field of it (``strategy=fedadam`` is ``strategy.name=fedadam``)
SHORTHANDS = {"strategy": "name", "sync": "name", "codec": "up", "model": "name", "adapter": "method", "data": "dataset"}

_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently coerce) one value against a field type; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) leaves exponents without a dot, like 1e-3, as strings
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, f"unsupported type {tp}")


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping; keys in errors start with ``prefix``."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}", f"unknown key{did_you_mean(key, names)} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not prefix and isinstance(value, str) and key in SHORTHANDS:
                value = {SHORTHANDS[key]: value}
            kwargs[key] = build_section(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known spelling of a mistyped ``word`` ('' when none is close)."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(text, "overrides look like key=value (for example rounds=10 adapter.r=16)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(text, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def merge_override(tree: dict[str, Any], path: list[str], value: Any, key: str | None = None) -> None:
    """Set ``tree[path[0]]...[path[-1]] = value``, creating sections; ``key`` names it in errors."""
    node = tree
    if len(path) == 1 and path[0] in SHORTHANDS and isinstance(value, str) and isinstance(tree.get(path[0]), dict):
        # ``strategy=fedadam`` after ``strategy.server_lr=0.1``: names the section's choice, keeps the rest
        tree[path[0]] = {**tree[path[0]], SHORTHANDS[path[0]]: value}
        return
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if i == 0 and part in SHORTHANDS and isinstance(child, str):
            child = node[part] = {SHORTHANDS[part]: child}  # a shorthand given before the section's keys
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key or ".".join(path), f"{part} is not a section")
        node = child
    node[path[-1]] = value


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping at the top of a YAML config file ({} for no file); errors name ``--config``."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"no such file: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{p} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{p} must hold a mapping at the top level")
    return loaded


def read_config_tree(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML file's mapping (optional) with the ``key=value`` overrides merged in."""
    tree = read_config_file(path)
    for text in overrides:
        keys, value = parse_override(text)
        merge_override(tree, keys, value)
    return tree


#: earlier spellings of ``aggregation``, still read: (section, key, value) -> aggregation
_LEGACY_AGGREGATION = {("sync", "name", "allreduce"): "allreduce", ("ray", "mode", "allreduce"): "allreduce", ("ray", "mode", "actors"): "coordinator"}
_warned: set[str] = set()


def upgrade_legacy_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """``sync.name: allreduce`` and ``ray.mode`` (earlier spellings) become ``aggregation``; a note on stderr says so once.

    An explicit ``aggregation`` that contradicts them is a config error.
    """
    tree = dict(tree)
    for (section, key, value), aggregation in _LEGACY_AGGREGATION.items():
        part = tree.get(section)
        if not isinstance(part, dict) or key not in part or str(part[key]).strip().lower() != value:
            continue
        part = dict(part)
        part.pop(key)
        if section == "sync":
            part["name"] = "sync"  # all-reduce rounds are synchronous
        tree[section] = part
        given = tree.get("aggregation")
        if given is not None and str(given).strip().lower() != aggregation:
            raise ConfigError(f"{section}.{key}", f"{section}.{key}={value} means aggregation={aggregation}, but aggregation={given} is set; keep one")
        tree["aggregation"] = aggregation
        if f"{section}.{key}" not in _warned:
            _warned.add(f"{section}.{key}")
            print(f"dpeft: note: {section}.{key}={value} is spelled aggregation={aggregation} now (the old spelling still works)", file=sys.stderr)
    return tree


def build_config(tree: dict[str, Any]) -> RunConfig:
    """A RunConfig from its dict form, with types and the core sections checked (not the families')."""
    cfg = build_section(RunConfig, upgrade_legacy_keys(tree), "")
    check_core(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict form (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def reference_rows(cls: type, prefix: str) -> list[str]:
    """Markdown table rows (key, default, help) of every field of dataclass ``cls``, nested ones flattened."""
    rows: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(reference_rows(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"schema field {prefix}{f.name} has no default")
        rows.append(f"| `{prefix}{f.name}` | `{yaml_inline(default)}` | {f.metadata.get('help', '')} |")
    return rows


def yaml_inline(value: Any) -> str:
    """``value`` as one line of YAML flow style (how the reference shows defaults)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
