"""Typed options of registered implementations (a strategy's ``strategy.options``, a codec's
``codec.options``): a keyword-only dataclass per implementation whose fields each carry a
default, a one-line help and, for numbers, a range.

:func:`option` declares a field; :func:`parse_options` builds the dataclass from the user's
mapping (unknown keys, wrong types and values out of range raise
:class:`~dpeft.errors.ConfigError` naming ``<prefix>.<key>``); :func:`option_help` lists the
fields with their help for the config reference.

Values arrive from YAML or ``key=value`` overrides, so with ``lenient`` parsing a number may
come as a string (YAML 1.1 reads ``1e-3`` as one) and an integer as an integral float; null
means the default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from dpeft.errors import ConfigError


def option(
    default: Any,
    help: str,  # noqa: A002 - mirrors dataclasses naming
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] = (),
) -> Any:
    """A dataclass field: ``default``, a one-line ``help``, an optional range or set of choices."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


def option_help(options_cls: type) -> dict[str, str]:
    """Field name -> help of an options dataclass (in declaration order)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(options_cls)}


def option_defaults(options_cls: type) -> dict[str, Any]:
    """Field name -> default of an options dataclass."""
    return {f.name: f.default for f in dataclasses.fields(options_cls)}


def parse_options(options_cls: type, raw: Mapping[str, Any], prefix: str, owner: str) -> Any:
    """An ``options_cls`` from ``raw``; errors name ``<prefix>.<key>`` and say what ``owner`` knows."""
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", f"unknown option for {owner}; known: {', '.join(sorted(fields))}")
        if value is None:
            continue
        values[key] = _checked(f"{prefix}.{key}", value, hints[key], fields[key].metadata)
    return options_cls(**values)


def _checked(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` parsed as ``tp`` (``X | None`` reads as ``X``) and checked against the field's range."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is float:
        out: Any = _as_float(key, value)
    elif tp is int:
        out = _as_int(key, value)
    elif typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        if (
            isinstance(value, (str, bytes))
            or not hasattr(value, "__iter__")
            or not all(isinstance(v, str) and v.strip() for v in value)
        ):
            raise ConfigError(key, f"must be a list of names, got {value!r}")
        return [v.strip() for v in value]
    elif typing.get_origin(tp) is list:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(key, f"must be a list of integers, got {value!r}")
        out = [_as_int(key, v) for v in value]
        if not out:
            raise ConfigError(key, "must not be empty")
        for v in out:
            _check_range(key, v, meta)
        return out
    elif tp is str:
        choices = meta.get("choices") or ()
        if not isinstance(value, str) or (choices and value.strip() not in choices):
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value.strip()
    else:
        raise TypeError(f"option {key}: unsupported type {tp}")
    _check_range(key, out, meta)
    return out


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ConfigError(key, f"must be a number, got {value!r}") from None
    else:
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(out):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return out


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, f"must be an integer, got {value!r}")


def _check_range(key: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        raise ConfigError(key, f"must be {'>' if meta.get('low_open') else '>='} {low}, got {value}")
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        raise ConfigError(key, f"must be {'<' if meta.get('high_open') else '<='} {high}, got {value}")
