"""Codec registry, the ``a+b`` spec parser and the config shape ``codec: {up, down, options}``.

Each codec is registered with a factory and a typed options dataclass (fields with a default
and a help: :class:`~dpeft.codec.updates.int8.Int8Options`, ...). ``make_codec("topk+int8",
{"fraction": 0.05, "block_size": 128})`` builds a chain. Options are shared by all stages (and
by the up and down codecs), so each stage reads the fields of its own options class; an option
no registered codec knows is an error. Every problem raises ``ConfigError(key, ...)`` where
``key`` is the config key being read (``codec.up``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dpeft.codec.updates.base import UpdateCodec
from dpeft.codec.updates.cast import bf16, fp16, fp32
from dpeft.codec.updates.chain import ChainCodec
from dpeft.codec.updates.int8 import Int8Codec, Int8Options
from dpeft.codec.updates.topk import TopKCodec, TopKOptions
from dpeft.errors import ConfigError
from dpeft.plugins import replaces_same_definition


@dataclass(kw_only=True)
class NoOptions:
    """A codec that reads no options."""


#: factory(its options dataclass) -> codec; raises ValueError for a bad option value
CodecFactory = Callable[[Any], UpdateCodec]


class RegisteredCodec(NamedTuple):
    """A registered codec: how to build it and the options dataclass it reads."""

    factory: CodecFactory
    options: type


_REGISTRY: dict[str, RegisteredCodec] = {}


def register_codec(name: str, factory: CodecFactory | None = None, options: type = NoOptions) -> Any:
    """Make ``name`` usable in specs; ``factory`` gets an ``options`` instance built from ``codec.options``.

    Without ``factory`` this is a decorator of the factory (a codec class taking its options, or a
    function): ``@register_codec("sign", options=SignOptions)``. Registering the same factory again
    (a reloaded module) replaces it; another one under a taken name is an error."""
    if not name or "+" in name or name != name.strip().lower():
        raise ValueError(f"bad codec name {name!r}")

    def add(fn: CodecFactory) -> CodecFactory:
        old = _REGISTRY.get(name)
        if old is not None and not (getattr(fn, "__qualname__", "") != "<lambda>" and replaces_same_definition(old.factory, fn)):
            raise ValueError(f"codec {name!r} is already registered")
        _REGISTRY[name] = RegisteredCodec(fn, options)
        return fn

    if factory is None:
        return add
    add(factory)
    return None


def available_codecs() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_REGISTRY)


def registered_codecs() -> dict[str, RegisteredCodec]:
    """Name -> (factory, options dataclass) of every registered codec."""
    return dict(_REGISTRY)


def known_options() -> list[str]:
    """Option keys some registered codec reads, sorted."""
    return sorted({f.name for entry in _REGISTRY.values() for f in dataclasses.fields(entry.options)})


def _options_for(entry: RegisteredCodec, options: Mapping[str, Any]) -> Any:
    """The codec's options dataclass from the shared mapping (its own fields only; the codec checks values)."""
    return entry.options(**{f.name: options[f.name] for f in dataclasses.fields(entry.options) if f.name in options})


register_codec("fp32", lambda o: fp32())
register_codec("fp16", lambda o: fp16())
register_codec("bf16", lambda o: bf16())
register_codec("int8", lambda o: Int8Codec(o.block_size), Int8Options)
register_codec("topk", lambda o: TopKCodec(o.fraction), TopKOptions)


def make_codec(spec: str, options: Mapping[str, Any] | None = None, *, key: str = "codec.up") -> UpdateCodec:
    """Build the codec named by ``spec`` ("int8", "topk+int8", ...); ConfigError(key) if bad."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(key, f"codec options must be a mapping, got {type(options).__name__}")
    known = set(known_options())
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        raise ConfigError(key, f"unknown codec option(s) {', '.join(unknown)} (known: {', '.join(known_options())})")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(key, f"must be a codec name such as 'int8' or 'topk+int8', got {spec!r}")
    names = [p.strip().lower() for p in spec.split("+")]
    stages: list[UpdateCodec] = []
    for i, name in enumerate(names):
        if not name:
            raise ConfigError(key, f"empty stage in codec spec {spec!r}")
        if name not in _REGISTRY:
            raise ConfigError(key, f"unknown codec {name!r} (known: {', '.join(available_codecs())})")
        if name in names[:i]:
            raise ConfigError(key, f"codec {name!r} appears twice in {spec!r}")
        try:
            stage = _REGISTRY[name].factory(_options_for(_REGISTRY[name], options))
        except ValueError as exc:
            raise ConfigError(key, f"codec {name!r}: {exc}") from None
        if stages and stages[-1].terminal:
            raise ConfigError(key, f"codec {stages[-1].name!r} must be the last stage of {spec!r}")
        stages.append(stage)
    return stages[0] if len(stages) == 1 else ChainCodec(stages)


def codec_from_spec(name: str, options: Mapping[str, Any] | None = None, key: str = "codec.up") -> UpdateCodec:
    """The codec for config value ``name`` with the shared ``options`` (see make_codec)."""
    return make_codec(name, options, key=key)


@dataclass(frozen=True)
class CodecSpec:
    """``codec: {up: "int8", down: "fp32", options: {block_size: 256, fraction: 0.01}}``."""

    up: str = "fp32"
    down: str = "fp32"
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None, key: str = "codec") -> CodecSpec:
        """Parse and validate a config section (None means fp32 both ways)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(key, f"must be a mapping with up, down, options; got {type(raw).__name__}")
        extra = sorted(str(k) for k in raw if k not in ("up", "down", "options"))
        if extra:
            raise ConfigError(f"{key}.{extra[0]}", "unknown key (expected up, down, options)")
        options = raw.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{key}.options", f"must be a mapping, got {type(options).__name__}")
        spec = cls(raw.get("up", "fp32"), raw.get("down", "fp32"), dict(options))
        spec.up_codec(f"{key}.up")
        spec.down_codec(f"{key}.down")
        return spec

    def up_codec(self, key: str = "codec.up") -> UpdateCodec:
        """Codec for worker -> coordinator updates."""
        return codec_from_spec(self.up, self.options, key)

    def down_codec(self, key: str = "codec.down") -> UpdateCodec:
        """Codec for coordinator -> worker states."""
        return codec_from_spec(self.down, self.options, key)
