"""Reading and validating ``strategy.options`` values.

Options arrive from YAML or ``key=value`` overrides, so a number may come as a string
("1e-3" is a string to YAML 1.1). These helpers accept numbers and numeric strings,
reject booleans and everything else, check ranges, and raise
:class:`~dpeft.errors.ConfigError` naming ``strategy.options.<key>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpeft.errors import ConfigError

_MISSING = object()


def option_key(key: str) -> str:
    """The dotted config key an option error names."""
    return f"strategy.options.{key}"


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(option_key(key), f"must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise ConfigError(option_key(key), f"must be a number, got {value!r}") from None
    else:
        raise ConfigError(option_key(key), f"must be a number, got {value!r}")
    if not math.isfinite(out):
        raise ConfigError(option_key(key), f"must be finite, got {value!r}")
    return out


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(option_key(key), f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(option_key(key), f"must be an integer, got {value!r}")


def _check_range(key: str, value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(option_key(key), f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(option_key(key), f"must be {'<' if high_open else '<='} {high}, got {value}")


def float_option(
    options: Mapping[str, Any],
    key: str,
    default: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float | None:
    """``options[key]`` as a float in range; ``default`` when absent or null (``None`` allowed only as default)."""
    value = options.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    out = _as_float(key, value)
    _check_range(key, out, low, high, low_open, high_open)
    return out


def int_option(
    options: Mapping[str, Any],
    key: str,
    default: int | None,
    *,
    low: int | None = None,
    high: int | None = None,
) -> int | None:
    """``options[key]`` as an int in ``[low, high]``; ``default`` when absent or null."""
    value = options.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    out = _as_int(key, value)
    _check_range(key, out, low, high, False, False)
    return out


def int_list_option(options: Mapping[str, Any], key: str, *, low: int | None = None) -> list[int] | None:
    """``options[key]`` as a non-empty list of ints, each ``>= low``; ``None`` when absent or null."""
    value = options.get(key, _MISSING)
    if value is _MISSING or value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(option_key(key), f"must be a list of integers, got {value!r}")
    out = [_as_int(key, v) for v in value]
    if not out:
        raise ConfigError(option_key(key), "must not be empty")
    for v in out:
        _check_range(key, v, low, None, False, False)
    return out


def choice_option(options: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """``options[key]``, one of ``choices`` (strings); ``default`` when absent or null."""
    value = options.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, str) or value.strip() not in choices:
        raise ConfigError(option_key(key), f"must be one of {', '.join(choices)}, got {value!r}")
    return value.strip()
