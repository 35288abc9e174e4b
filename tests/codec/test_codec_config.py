"""Codec registry, spec parsing and the ``codec: {up, down, options}`` config shape."""

from __future__ import annotations

import pytest

from dpeft.codec.updates import (
    ChainCodec,
    CodecSpec,
    Int8Codec,
    TopKCodec,
    available_codecs,
    codec_from_spec,
    known_options,
    make_codec,
    register_codec,
)
from dpeft.codec.updates.cast import fp32
from dpeft.errors import ConfigError


def test_registry_contents() -> None:
    assert {"fp32", "fp16", "bf16", "int8", "topk"} <= set(available_codecs())
    assert {"block_size", "fraction"} <= set(known_options())


def test_make_single_and_chain() -> None:
    c = make_codec("int8", {"block_size": 128, "fraction": 0.5})
    assert isinstance(c, Int8Codec) and c.block_size == 128 and c.params() == {"block_size": 128}
    t = make_codec("topk")
    assert isinstance(t, TopKCodec) and t.fraction == 0.01
    ch = make_codec(" TopK + int8 ", {"fraction": 0.1})
    assert isinstance(ch, ChainCodec) and ch.name == "topk+int8" and ch.terminal
    assert ch.params() == {"topk": {"fraction": 0.1}, "int8": {"block_size": 256}}
    assert make_codec("fp16").name == "fp16" and make_codec("bf16+topk").name == "bf16+topk"


@pytest.mark.parametrize(
    "spec, options, message",
    [
        ("int4", {}, "unknown codec 'int4'"),
        ("", {}, "must be a codec name"),
        (None, {}, "must be a codec name"),
        ("topk+", {}, "empty stage"),
        ("int8+topk", {}, "'int8' must be the last stage"),
        ("topk+topk", {}, "appears twice"),
        ("int8", {"block_size": 0}, "block_size"),
        ("int8", {"block_size": -3}, "block_size"),
        ("int8", {"block_size": "256"}, "block_size"),
        ("int8", {"block_size": True}, "block_size"),
        ("int8", {"block_size": 2.5}, "block_size"),
        ("int8", {"block_size": 1 << 30}, "block_size"),
        ("topk", {"fraction": 0}, "fraction"),
        ("topk", {"fraction": 1.5}, "fraction"),
        ("topk", {"fraction": float("nan")}, "fraction"),
        ("topk", {"fraction": "0.1"}, "fraction"),
        ("fp32", {"blocksize": 3}, "unknown codec option"),
        ("fp32", [1, 2], "must be a mapping"),
    ],
)
def test_bad_specs(spec: object, options: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        codec_from_spec(spec, options)  # type: ignore[arg-type]
    assert exc.value.key == "codec.up" and exc.value.exit_code == 2
    with pytest.raises(ConfigError) as exc:
        codec_from_spec(spec, options, key="codec.down")  # type: ignore[arg-type]
    assert exc.value.key == "codec.down"


def test_codec_spec_from_config() -> None:
    spec = CodecSpec.from_config({"up": "topk+int8", "down": "fp16", "options": {"block_size": 64, "fraction": 0.02}})
    assert spec.up_codec().name == "topk+int8" and spec.down_codec().name == "fp16"
    assert spec.up_codec().params() == {"topk": {"fraction": 0.02}, "int8": {"block_size": 64}}
    default = CodecSpec.from_config(None)
    assert default == CodecSpec() and default.up_codec().name == "fp32" and default.down_codec().name == "fp32"
    assert CodecSpec.from_config({"up": "int8"}).down == "fp32"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"up": "int9"}, "codec.up"),
        ({"down": "int8+topk"}, "codec.down"),
        ({"up": "int8", "options": {"block_size": 0}}, "codec.up"),
        ({"options": [1]}, "codec.options"),
        ({"upp": "int8"}, "codec.upp"),
        ("int8", "codec"),
    ],
)
def test_codec_spec_errors(raw: object, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        CodecSpec.from_config(raw)  # type: ignore[arg-type]
    assert exc.value.key == key


def test_register_custom_codec() -> None:
    with pytest.raises(ValueError):
        register_codec("fp32", lambda o: fp32())
    with pytest.raises(ValueError):
        register_codec("a+b", lambda o: fp32())
