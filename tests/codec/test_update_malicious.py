"""Untrusted wire input to update codecs: every malformed update is a ProtocolError."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpeft.codec.tensors import encode_state
from dpeft.codec.updates import META_KEY, decode_update, make_codec
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState

OPTS = {"fraction": 0.25, "block_size": 4}
STATE = AdapterState(OrderedDict(a=torch.randn(4, 5), b=torch.randn(7), c=torch.zeros(0, 3)), {"round": 2})
SCHEMA = STATE.schema()


def wire_for(spec: str) -> AdapterState:
    w = make_codec(spec, OPTS).encode(STATE)
    return AdapterState(OrderedDict((k, v.clone()) for k, v in w.items()), copy.deepcopy(w.meta))


def put(w: AdapterState, name: str, t: torch.Tensor) -> AdapterState:
    w.tensors[name] = t
    return w


def rec(w: AdapterState, fn: Callable[[dict], None]) -> AdapterState:
    fn(w.meta[META_KEY])
    return w


CASES: dict[str, tuple[str, Callable[[AdapterState], AdapterState], str]] = {
    "index out of range": ("topk", lambda w: put(w, "b::idx", torch.tensor([0, 7], dtype=torch.int32)), r"index 7 at position 1 is outside \[0, 7\)"),
    "negative index": ("topk", lambda w: put(w, "b::idx", torch.tensor([-1, 3], dtype=torch.int32)), "index -1 at position 0"),
    "duplicate index": ("topk", lambda w: put(w, "b::idx", torch.tensor([3, 3], dtype=torch.int32)), "not strictly increasing at position 1"),
    "unsorted index": ("topk", lambda w: put(w, "b::idx", torch.tensor([4, 2], dtype=torch.int32)), "not strictly increasing"),
    "index out of range in chain": ("topk+int8", lambda w: put(w, "a::idx", torch.tensor([0, 1, 2, 3, 99], dtype=torch.int32)), "index 99"),
    "too many indices": ("topk", lambda w: put(w, "b::idx", torch.tensor([0, 1, 2], dtype=torch.int32)), r"'b::idx': shape \[3\] but expected \[2\]"),
    "index dtype": ("topk", lambda w: put(w, "b::idx", w["b::idx"].long()), "'b::idx': dtype I64 but expected I32"),
    "q too short": ("int8", lambda w: put(w, "a::q", w["a::q"][:-1].clone()), r"'a::q': shape \[19\] but expected \[20\]"),
    "q too long": ("int8", lambda w: put(w, "b::q", torch.zeros(1000, dtype=torch.int8)), r"'b::q': shape \[1000\] but expected \[7\]"),
    "q wrong dtype": ("int8", lambda w: put(w, "b::q", w["b::q"].to(torch.uint8)), "dtype U8 but expected I8"),
    "scale count": ("int8", lambda w: put(w, "b::scale", torch.ones(3)), r"'b::scale': shape \[3\] but expected \[2\]"),
    "q -128": ("int8", lambda w: put(w, "b::q", torch.full((7,), -128, dtype=torch.int8)), "value -128"),
    "scale nan": ("int8", lambda w: put(w, "b::scale", torch.tensor([0.1, float("nan")])), r"scale\[1\] = nan"),
    "scale negative": ("int8", lambda w: put(w, "b::scale", torch.tensor([-0.1, 0.1])), r"scale\[0\]"),
    "scale inf": ("topk+int8", lambda w: put(w, "a::val::scale", torch.tensor([float("inf"), 1.0])), "scale"),
    "scale overflowing": ("int8", lambda w: put(w, "b::scale", torch.tensor([3e38, 0.0])), "scale"),
    "extra wire tensor": ("fp32", lambda w: put(w, "zzz", torch.ones(1)), "unexpected wire tensors: 'zzz'"),
    "missing wire tensor": ("int8", lambda w: (w.tensors.pop("a::scale"), w)[1], "missing wire tensors: 'a::scale'"),
    "fp16 part wrong shape": ("fp16", lambda w: put(w, "a", w["a"].reshape(5, 4)), r"'a': shape \[5, 4\] but expected \[4, 5\]"),
    "unknown original name": ("int8", lambda w: rec(w, lambda r: r["orig"].append(["zzz", [3], "F32"])), "unknown tensor 'zzz'"),
    "unknown original name only": ("int8", lambda w: rec(w, lambda r: r["orig"].__setitem__(0, ["zzz", [4, 5], "F32"])), "unknown tensor 'zzz'"),
    "original shape mismatch": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(0, ["a", [20], "F32"])), r"'a': shape \[20\] but expected \[4, 5\]"),
    "original dtype mismatch": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(0, ["a", [4, 5], "F16"])), "'a': dtype 'F16' but expected F32"),
    "original dtype unknown": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(0, ["a", [4, 5], "F99"])), "dtype 'F99'"),
    "original shape bools": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(1, ["b", [True], "F32"])), "shape"),
    "duplicate original": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(1, ["a", [4, 5], "F32"])), "'a' twice"),
    "missing original": ("fp32", lambda w: rec(w, lambda r: r["orig"].pop(1)), "missing tensors: 'b'"),
    "orig entry malformed": ("fp32", lambda w: rec(w, lambda r: r["orig"].__setitem__(0, "a")), "entry 0"),
    "orig not a list": ("fp32", lambda w: rec(w, lambda r: r.__setitem__("orig", {"a": 1})), "must be a list"),
    "orig too long": ("fp32", lambda w: rec(w, lambda r: r["orig"].extend([["a", [4, 5], "F32"]] * 10**4)), "'a' twice"),
    "wrong codec": ("int8", lambda w: rec(w, lambda r: r.__setitem__("codec", "fp32")), "encoded with codec 'fp32', expected 'int8'"),
    "wrong params": ("int8", lambda w: rec(w, lambda r: r.__setitem__("params", {"block_size": 8})), "parameters"),
    "extra record key": ("int8", lambda w: rec(w, lambda r: r.__setitem__("x", 1)), "keys codec, params, orig"),
    "no record": ("int8", lambda w: (w.meta.pop(META_KEY), w)[1], "no codec record"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malicious_wire(case: str) -> None:
    spec, mutate, message = CASES[case]
    codec = make_codec(spec, OPTS)
    bad = mutate(wire_for(spec))
    with pytest.raises(ProtocolError, match=message):
        codec.decode(bad, SCHEMA)


def test_subset_allowed_only_when_asked() -> None:
    codec = make_codec("topk+int8", OPTS)
    part = AdapterState(OrderedDict(b=STATE["b"]))
    wire = codec.encode(part)
    with pytest.raises(ProtocolError, match="missing tensors: 'a', 'c'"):
        codec.decode(wire, SCHEMA)
    out = codec.decode(wire, SCHEMA, allow_subset=True)
    assert list(out.tensors) == ["b"]


def test_payload_header_checked_against_wire_schema() -> None:
    """decode_update rejects a payload whose header disagrees with the expected wire layout."""
    codec = make_codec("int8", OPTS)
    bad = put(wire_for("int8"), "a::q", torch.zeros(10**6, dtype=torch.int8))
    with pytest.raises(ProtocolError, match=r"'a::q': shape \[1000000\] but expected \[20\]"):
        decode_update(codec, encode_state(bad), SCHEMA)
    with pytest.raises(ProtocolError, match="unknown tensor names: a"):
        decode_update(codec, encode_state(wire_for("fp32")), SCHEMA)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = ["fp16", "int8", "topk", "topk+int8", "bf16+topk+int8"]


@FUZZ
@given(st.sampled_from(SPECS), st.data())
def test_fuzz_replaced_wire_tensors(spec: str, data: st.DataObject) -> None:
    """Random tensors in place of wire parts: decode succeeds or raises ProtocolError only."""
    codec = make_codec(spec, OPTS)
    wire = wire_for(spec)
    for name in data.draw(st.lists(st.sampled_from(list(wire.tensors)), max_size=3)):
        old = wire[name]
        n = data.draw(st.integers(0, 30)) if data.draw(st.booleans()) else old.numel()
        if old.dtype.is_floating_point:
            vals = data.draw(st.lists(st.floats(width=32), min_size=n, max_size=n))
        else:
            vals = data.draw(st.lists(st.integers(-200, 200), min_size=n, max_size=n))
        wire.tensors[name] = torch.tensor(vals, dtype=torch.float64 if old.dtype.is_floating_point else torch.int64).to(old.dtype)
    try:
        codec.decode(wire, SCHEMA)
    except ProtocolError:
        pass


@FUZZ
@given(st.sampled_from(SPECS), st.lists(st.integers(0, 10**6), min_size=1, max_size=4), st.integers(0, 10**6))
def test_fuzz_update_payload_bytes(spec: str, flips: list[int], cut: int) -> None:
    codec = make_codec(spec, OPTS)
    buf = bytearray(encode_state(codec.encode(STATE)))
    for bit in flips:
        bit %= len(buf) * 8
        buf[bit // 8] ^= 1 << (bit % 8)
    for payload in (bytes(buf), bytes(buf[: cut % (len(buf) + 1)])):
        try:
            decode_update(codec, payload, SCHEMA)
        except ProtocolError:
            pass
