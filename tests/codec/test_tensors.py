"""Tests of the base payload codec (dpeft.codec.tensors): format, streaming, validation, fuzz."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections import OrderedDict

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpeft.codec.tensors import (
    DTYPES,
    Limits,
    StateDecoder,
    decode_state,
    encode_state,
    encoded_size,
    iter_chunks,
    iter_encoded,
    write_into,
    zeroed_buffer,
)
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def all_dtype_state() -> AdapterState:
    tensors = OrderedDict()
    for i, (name, dtype) in enumerate(DTYPES.items()):
        for shape in [(), (0,), (0, 5), (3, 4)]:
            tensors[f"{name}/{len(shape)}/{shape[0] if shape else 's'}"] = sample(dtype, shape, i)
    return AdapterState(tensors, {"round": 3, "note": "äß", "nested": {"a": [1, 2.5, None]}})


def assert_same(a: AdapterState, b: AdapterState) -> None:
    assert list(a.tensors) == list(b.tensors)
    assert a.meta == b.meta
    for k in a.tensors:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def small_state() -> AdapterState:
    return AdapterState(OrderedDict(a=torch.arange(5, dtype=torch.float32), b=torch.ones(2, 3, dtype=torch.float16), c=torch.zeros(0)), {"r": 1})


def raw_payload(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


# -- round trips ---------------------------------------------------------------------------
def test_round_trip_all_dtypes() -> None:
    s = all_dtype_state()
    payload = encode_state(s)
    assert len(payload) == encoded_size(s)
    assert_same(s, decode_state(payload, s.schema()))
    assert_same(s, decode_state(payload))


def test_readable_by_safetensors() -> None:
    s = all_dtype_state()
    loaded = safetensors.torch.load(encode_state(s))
    assert set(loaded) == set(s.tensors)
    for k, v in loaded.items():
        assert torch.equal(v, s[k])


def test_large_and_noncontiguous() -> None:
    big = torch.randn(300, 1000)
    s = AdapterState(OrderedDict(big=big, t=torch.randn(40, 30).t(), e=torch.empty(0, 7, dtype=torch.bfloat16)))
    out = decode_state(encode_state(s), s.schema())
    assert_same(s, out)


@pytest.mark.parametrize("size", [1, 7, 8, "header", "header+1", "header-1", 10**9])
def test_chunked_streaming(size: object) -> None:
    s = small_state() if size == 1 else all_dtype_state()
    payload = encode_state(s)
    header_len = 8 + struct.unpack("<Q", payload[:8])[0]
    n = {"header": header_len, "header+1": header_len + 1, "header-1": header_len - 1}.get(size, size)  # type: ignore[arg-type]
    chunks = list(iter_chunks(iter_encoded(s), n))
    assert b"".join(chunks) == payload
    assert all(len(c) == n for c in chunks[:-1]) and 0 < len(chunks[-1]) <= n
    dec = StateDecoder(s.schema())
    for c in chunks:
        dec.feed(c)
    assert dec.received == len(payload)
    assert_same(s, dec.finish())


def test_iter_chunks_rejects_nonpositive_size() -> None:
    with pytest.raises(ValueError):
        list(iter_chunks([b"abc"], 0))


def test_empty_state() -> None:
    s = AdapterState()
    assert_same(s, decode_state(encode_state(s), s.schema()))


# -- schema ---------------------------------------------------------------------------------
def test_schema_unknown_and_missing_names() -> None:
    s = small_state()
    payload = encode_state(s)
    schema = s.schema()
    schema.pop("a")
    with pytest.raises(ProtocolError, match="unknown tensor names: a"):
        decode_state(payload, schema)
    schema = s.schema()
    schema["zz"] = ((1,), torch.float32)
    with pytest.raises(ProtocolError, match="missing tensor names: zz"):
        decode_state(payload, schema)
    out = decode_state(payload, schema, allow_subset=True)
    assert list(out.tensors) == ["a", "b", "c"]


def test_schema_wrong_shape_and_dtype() -> None:
    s = small_state()
    payload = encode_state(s)
    schema = s.schema()
    schema["b"] = ((3, 2), torch.float16)
    with pytest.raises(ProtocolError, match=r"'b': shape \[2, 3\] but expected \[3, 2\]"):
        decode_state(payload, schema)
    schema = s.schema()
    schema["b"] = ((2, 3), torch.float32)
    with pytest.raises(ProtocolError, match="'b': dtype F16 but expected F32"):
        decode_state(payload, schema)


# -- limits -----------------------------------------------------------------------------------
def test_header_too_large_rejected_from_length_prefix() -> None:
    dec = StateDecoder(limits=Limits(max_header_bytes=1024))
    with pytest.raises(ProtocolError, match="header of 1048576 bytes"):
        dec.feed(struct.pack("<Q", 1 << 20))


def test_total_too_large_rejected_without_allocating() -> None:
    header = {"a": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}
    payload = raw_payload(header)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="limit 1048576"):
            decode_state(payload, limits=Limits(max_total_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    huge = {"a": {"dtype": "F64", "shape": [(1 << 40) - 1] * 8, "data_offsets": [0, 8 * ((1 << 40) - 1) ** 8]}}
    with pytest.raises(ProtocolError, match="data bytes"):
        decode_state(raw_payload(huge))


def test_schema_checked_before_allocation() -> None:
    header = {"a": {"dtype": "F32", "shape": [1 << 28], "data_offsets": [0, 1 << 30]}}
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="expected"):
            StateDecoder({"a": ((4,), torch.float32)}).feed(raw_payload(header))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_tensor_count_and_dims_limits() -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(5)}
    with pytest.raises(ProtocolError, match="5 tensors"):
        decode_state(raw_payload(header), limits=Limits(max_tensors=4))
    deep = {"a": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}
    with pytest.raises(ProtocolError, match="bad shape"):
        decode_state(raw_payload(deep, b"x"))


# -- truncation and malformed headers ---------------------------------------------------------
def test_every_truncation_is_a_protocol_error() -> None:
    payload = encode_state(small_state())
    for cut in range(len(payload)):
        dec = StateDecoder()
        with pytest.raises(ProtocolError):
            dec.feed(payload[:cut])
            dec.finish()


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(ProtocolError, match="longer than its header"):
        decode_state(encode_state(small_state()) + b"\0")


@pytest.mark.parametrize(
    "header",
    [
        b"\xff\xfe not utf8",
        b"{not json",
        b"[1, 2]",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the recursion limit
        b'{"a": ' + b"1" * 5000 + b"}",  # integer too long for int()
        {"__metadata__": [1]},
        {"__metadata__": {"dpeft": "{oops"}},
        {"__metadata__": {"dpeft": "[" * 100_000}},
        {"__metadata__": {"dpeft": "1" * 5000}},
        {"__metadata__": {"dpeft": "[1]"}},
        {"__metadata__": {"dpeft": 5}},
        {"a": 5},
        {"a": {"dtype": "F32", "shape": [1]}},
        {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}},
        {"a": {"dtype": 1, "shape": [1], "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    ],
)
def test_malformed_headers(header: object) -> None:
    with pytest.raises(ProtocolError):
        decode_state(raw_payload(header, b"\0" * 8))


def test_finish_before_header() -> None:
    dec = StateDecoder()
    dec.feed(b"\x10\0\0")
    with pytest.raises(ProtocolError, match="before its header"):
        dec.finish()


# -- fuzz -------------------------------------------------------------------------------------
VALID = encode_state(AdapterState(OrderedDict(a=torch.randn(3, 2), b=torch.arange(4, dtype=torch.int16), c=torch.tensor([True, False]), d=torch.ones(2, dtype=torch.bfloat16)), {"r": 1}))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_chunked(payload: bytes, cuts: list[int], **kw: object) -> None:
    """Feed ``payload`` split at ``cuts``; anything but ProtocolError fails the test."""
    dec = StateDecoder(**kw)  # type: ignore[arg-type]
    pos = 0
    try:
        for c in sorted(set(cuts)) + [len(payload)]:
            dec.feed(payload[pos:c])
            pos = max(pos, c)
        out = dec.finish()
    except ProtocolError:
        return
    for t in out.tensors.values():
        t.clone()


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=5))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    decode_chunked(data, cuts)
    decode_chunked(struct.pack("<Q", len(data)) + data, cuts)


@FUZZ
@given(st.integers(0, len(VALID)), st.lists(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=4), st.lists(st.integers(0, len(VALID)), max_size=4))
def test_fuzz_truncate_and_flip(cut: int, flips: list[int], cuts: list[int]) -> None:
    decode_chunked(VALID[:cut], cuts)
    buf = bytearray(VALID)
    for bit in flips:
        buf[bit // 8] ^= 1 << (bit % 8)
    decode_chunked(bytes(buf), cuts)
    decode_chunked(bytes(buf), cuts, schema=decode_state(VALID).schema())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
SPEC = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*DTYPES, "X"]) | JSON, "shape": st.lists(st.integers(-2, 5), max_size=3) | JSON, "data_offsets": st.lists(st.integers(-2, 80), min_size=2, max_size=2) | JSON}
)


@FUZZ
@given(st.dictionaries(st.text(max_size=4), SPEC | JSON, max_size=4), st.binary(max_size=64), st.lists(st.integers(0, 200), max_size=3))
def test_fuzz_structured_headers(header: dict, data: bytes, cuts: list[int]) -> None:
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    decode_chunked(raw_payload(raw, data), cuts)


def test_decode_in_place_views_a_writable_payload() -> None:
    """in_place: tensors view a bytearray / mmap payload, with the same validation as the copying
    decoder; bytes payloads are copied as before."""
    state = AdapterState(OrderedDict(a=torch.arange(3, dtype=torch.uint8), b=torch.randn(4, 5), c=torch.zeros(0)), {"r": 1})
    raw = encode_state(state)
    for buf in (bytearray(raw), zeroed_buffer(len(raw))):
        buf[:] = raw
        out = decode_state(buf, schema=state.schema(), in_place=True)
        assert out.meta == {"r": 1} and all(torch.equal(out.tensors[k], v) for k, v in state.tensors.items())
        base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        for k in ("a", "b"):  # views of the payload
            assert base <= out.tensors[k].data_ptr() < base + len(raw)
        out.tensors["a"][0] = 7
        assert buf[len(raw) - state.tensors["b"].numel() * 4 - 3] == 7
        for bad in (buf[:-1], buf + b"\0"):
            with pytest.raises(ProtocolError):
                decode_state(bytearray(bad), in_place=True)
    copied = decode_state(raw, in_place=True)  # bytes: copied into the decoder's own buffer
    assert torch.equal(copied.tensors["b"], state.tensors["b"])


def test_write_into_places_every_piece_exactly() -> None:
    """Small pieces (slice assignment) and large ones (numpy's copy, after faulting a memory
    map's pages in) land at their offset, from bytes or memoryviews, touching nothing else."""
    import os

    size = 3 << 20
    src = os.urandom(size)
    for buf in (bytearray(size + 8192), zeroed_buffer(size + 8192)):
        expect = bytearray(len(buf))
        pos = 0
        for n in (100, (1 << 16) - 1, 1 << 16, 5000, (1 << 20) + 3, size - 2 * (1 << 16) - 5100 - (1 << 20) - 3 + 1):
            piece = memoryview(src)[pos : pos + n] if n % 2 else src[pos : pos + n]
            write_into(buf, pos + 4097, piece)  # off the page grid
            expect[pos + 4097 : pos + 4097 + n] = src[pos : pos + n]
            pos += n
        assert bytes(buf) == bytes(expect)
