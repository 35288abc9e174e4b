"""Update codecs: real-wire round trips, per-codec error bounds, composition and sizes."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from codec_testlib import make_state, through_wire
from hypothesis import given, settings
from hypothesis import strategies as st

from dpeft.codec.tensors import encode_state
from dpeft.codec.updates import META_KEY, Int8Codec, TopKCodec, decode_update, encode_update, make_codec, wire_bytes
from dpeft.codec.updates.topk import index_dtype
from dpeft.state import AdapterState

SPECS = ["fp32", "fp16", "bf16", "int8", "topk", "topk+int8", "topk+fp16", "topk+bf16", "fp16+int8", "bf16+topk+int8"]
OPTIONS = {"fraction": 0.05, "block_size": 64}
# relative rounding of a cast to dtype (unit roundoff); 0 for a lossless cast
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def cast_err(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Bound on |x - cast(x)| for a float64 ``x`` (relative part plus subnormal floor)."""
    tiny = torch.finfo(target).smallest_normal * torch.finfo(target).eps
    return x.abs() * EPS[target] + tiny


def int8_bound(wire: AdapterState, prefix: str, n: int, block: int) -> torch.Tensor:
    scale = wire[prefix + "::scale"].double()
    return (scale / 2 * (1 + 1e-4)).repeat_interleave(block)[:n]


def check(spec: str, wire: AdapterState, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """Assert the error bound the codec ``spec`` promises for original ``x`` decoded as ``y``."""
    xd, yd = x.double().reshape(-1), y.double().reshape(-1)
    err = (xd - yd).abs()
    out = cast_err(yd, x.dtype) if x.dtype != torch.float32 else torch.zeros_like(yd)  # the cast back
    stages = spec.split("+")
    first = CASTS.get(stages[0])
    lead_cast = first is not None and first != x.dtype and len(stages) > 1
    if lead_cast:
        # a leading cast rounds on the way in and the inner stage's result is rounded to it again
        out = out + cast_err(xd, first) + cast_err(yd, first)
    if "topk" in stages:
        xs = x.to(first).double().reshape(-1) if lead_cast else xd  # what topk saw
        codec = TopKCodec(OPTIONS["fraction"])
        idx = wire[name + "::idx"].long()
        assert idx.numel() == codec.k_for(xd.numel())
        kept = torch.zeros_like(xd, dtype=torch.bool)
        kept[idx] = True
        assert torch.all(yd[~kept] == 0), "dropped entries must decode to zero"
        if (~kept).any() and kept.any():
            assert xs[kept].abs().min() >= xs[~kept].abs().max(), "kept entries must be the largest"
        xd, yd, err, out = xd[kept], yd[kept], err[kept], out[kept]
        prefix = name + "::val"
    else:
        prefix = name
    last = stages[-1]
    if last == "int8":
        bound = int8_bound(wire, prefix, xd.numel(), OPTIONS["block_size"]) + out
    elif last in ("fp16", "bf16"):
        bound = cast_err(xd, CASTS[last]) + out
    else:  # fp32, or topk alone: exact on what is kept
        bound = out
    assert torch.all(err <= bound), f"{spec} {name}: max excess {float((err - bound).max())}"


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_and_bounds(spec: str, float_dtype: torch.dtype) -> None:
    codec = make_codec(spec, OPTIONS)
    state = make_state(float_dtype)
    wire, out = through_wire(codec, state)
    assert list(out.tensors) == list(state.tensors)
    assert out.meta == state.meta and META_KEY not in out.meta
    assert wire.meta[META_KEY]["codec"] == codec.name == "+".join(spec.split("+"))
    for name, x in state.items():
        assert out[name].dtype == x.dtype and out[name].shape == x.shape
        check(spec, wire, name, x, out[name])
    # the bytes helpers agree with the two-step path
    payload = encode_update(codec, state)
    assert len(payload) == wire_bytes(codec.encode(state))
    again = decode_update(codec, payload, state.schema())
    for name in state.tensors:
        assert torch.equal(again[name], out[name])


@pytest.mark.parametrize("spec", SPECS)
def test_zero_and_empty_tensors(spec: str, float_dtype: torch.dtype) -> None:
    codec = make_codec(spec, OPTIONS)
    state = make_state(float_dtype, zeros=True)
    _, out = through_wire(codec, state)
    for name, x in state.items():
        assert torch.equal(out[name], x)
    empty = AdapterState(OrderedDict(), {"round": 1})
    _, out = through_wire(codec, empty)
    assert len(out) == 0 and out.meta == {"round": 1}


@pytest.mark.parametrize("spec", SPECS)
def test_non_float_tensors_pass_through(spec: str) -> None:
    state = AdapterState(OrderedDict(w=torch.randn(10), steps=torch.tensor([3, 4]), mask=torch.tensor([True, False])))
    wire, out = through_wire(make_codec(spec, OPTIONS), state)
    assert torch.equal(wire["steps"], state["steps"]) and torch.equal(out["steps"], state["steps"])
    assert torch.equal(out["mask"], state["mask"])


def test_fp32_is_identity_and_casts_relative_error() -> None:
    x = torch.randn(1000) * 10
    state = AdapterState(OrderedDict(w=x))
    assert torch.equal(through_wire(make_codec("fp32"), state)[1]["w"], x)
    y = through_wire(make_codec("fp16"), state)[1]["w"]
    assert float(((y - x).abs() / x.abs()).max()) <= 1e-3
    y = through_wire(make_codec("bf16"), state)[1]["w"]
    assert float(((y - x).abs() / x.abs()).max()) <= 4e-3


def test_fp16_clamps_instead_of_overflowing() -> None:
    state = AdapterState(OrderedDict(w=torch.tensor([1e6, -1e6, 1.0]), b=torch.tensor([1e6], dtype=torch.bfloat16)))
    _, out = through_wire(make_codec("fp16"), state)
    assert out["w"].tolist() == [65504.0, -65504.0, 1.0]
    assert torch.isfinite(out["b"].float()).all()


def test_int8_wire_layout() -> None:
    state = AdapterState(OrderedDict(w=torch.randn(10, 100)))
    wire = Int8Codec(256).encode(state)
    assert wire["w::q"].dtype == torch.int8 and wire["w::q"].shape == (1000,)
    assert wire["w::scale"].dtype == torch.float32 and wire["w::scale"].shape == (4,)
    assert int(wire["w::q"].abs().max()) == 127
    assert wire.meta[META_KEY] == {"codec": "int8", "params": {"block_size": 256}, "orig": [["w", [10, 100], "F32"]]}


def test_int8_is_3_9x_smaller_than_fp32() -> None:
    state = AdapterState(OrderedDict(w=torch.randn(1 << 16)), {"round": 1})
    fp32_bytes = wire_bytes(make_codec("fp32").encode(state))
    int8_bytes = wire_bytes(make_codec("int8").encode(state))
    assert int8_bytes == len(encode_state(make_codec("int8").encode(state)))
    assert fp32_bytes / int8_bytes >= 3.9
    topk_bytes = wire_bytes(make_codec("topk+int8").encode(state))
    assert topk_bytes < int8_bytes / 10


def test_topk_counts_and_index_dtype() -> None:
    codec = TopKCodec(0.01)
    assert [codec.k_for(n) for n in (0, 1, 50, 100, 149, 150, 300)] == [0, 1, 1, 1, 1, 2, 3]
    assert TopKCodec(1.0).k_for(7) == 7
    assert index_dtype(1 << 31) == torch.int32 and index_dtype((1 << 31) + 1) == torch.int64
    layout = codec.layout("w", (1 << 16, 1 << 16), torch.float16)  # layout only: nothing allocated
    assert layout["w::idx"].dtype == torch.int64 and layout["w::val"].shape == (codec.k_for(1 << 32),)


def test_topk_keeps_exactly_the_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05])
    state = AdapterState(OrderedDict(w=x.reshape(2, 4)))
    wire, out = through_wire(TopKCodec(0.375), state)  # k = 3
    assert wire["w::idx"].tolist() == [1, 3, 6]
    assert out["w"].reshape(-1).tolist() == [0, -5.0, 0, 3.0, 0, 0, 4.0, 0]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_subnormal=False, width=32), max_size=300),
    st.integers(1, 70),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_int8_bound_property(values: list[float], block: int, dtype: torch.dtype) -> None:
    x = torch.tensor(values, dtype=torch.float32).clamp(-60000, 60000).to(dtype)
    state = AdapterState(OrderedDict(w=x))
    wire, out = through_wire(Int8Codec(block), state)
    scale = wire["w::scale"].double().repeat_interleave(block)[: x.numel()]
    y = out["w"].double()
    bound = scale / 2 * (1 + 1e-4) + (cast_err(y, dtype) if dtype != torch.float32 else 0)
    assert torch.all((x.double() - y).abs() <= bound)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), max_size=200), st.floats(0.001, 1.0))
def test_topk_property(values: list[float], fraction: float) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    codec = TopKCodec(fraction)
    wire, out = through_wire(codec, AdapterState(OrderedDict(w=x)))
    idx = wire["w::idx"].long()
    assert idx.numel() == codec.k_for(x.numel())
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[idx] = True
    assert torch.equal(out["w"][kept], x[kept]) and torch.all(out["w"][~kept] == 0)
    if kept.any() and (~kept).any():
        assert x[kept].abs().min() >= x[~kept].abs().max()

