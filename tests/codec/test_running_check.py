"""RunningCheck: the norm and finiteness of a payload computed piece by piece as it streams in.

Whatever the piece sizes (a piece may end in the middle of an element), the result must be what
:func:`check_update` says of the decoded state: the same global L2 norm (exact for tensors under
1,024 values, within 1e-6 relative above: float32 row sums of squares added in float64), or the same
``RejectedUpdate("non_finite")`` naming the first tensor in payload order with a NaN or Inf.
Integer tensors never count, whatever their bytes would mean as floats.
"""

from __future__ import annotations

import math
import random
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dpeft.codec import spool_pool
from dpeft.codec.spool import SpooledState, SpoolPolicy
from dpeft.codec.tensors import StateDecoder, encode_state
from dpeft.codec.updates import CodecSpec, RunCodecs
from dpeft.codec.validation import RunningCheck, check_update
from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState
from dpeft.transport.grpc.uploads import Upload
from dpeft.transport.messages import UpdateHeader

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    spool_pool.clear()
    yield
    spool_pool.clear()


def mixed_state(seed: int = 0) -> AdapterState:
    """Every wire dtype family, empty tensors, a scalar and odd sizes (no size a multiple of 8)."""
    g = torch.Generator().manual_seed(seed)
    t = OrderedDict()
    t["f32"] = torch.randn(37, generator=g)
    t["bf16"] = (torch.randn(5, 7, generator=g) * 3).bfloat16()
    t["empty_f32"] = torch.empty(0, 3)
    t["f16"] = torch.randn(11, generator=g).half()
    t["i32"] = torch.tensor([0x7FC00000, 0x7F800000, -1, 5], dtype=torch.int32)  # NaN / +Inf bit patterns as floats
    t["f64"] = torch.randn(13, generator=g, dtype=torch.float64) * 1e3
    t["empty_f16"] = torch.empty(0).half()
    t["scalar"] = torch.tensor(-2.5)
    t["u8"] = torch.tensor([255, 127, 0], dtype=torch.uint8)
    t["f32_big"] = torch.randn(1001, generator=g)
    t["i64"] = torch.arange(3, dtype=torch.int64)
    t["f16_odd"] = torch.randn(3, generator=g).half()
    return AdapterState(t, {"round": 3})


def pieces(payload: bytes, mode: str | int, seed: int = 0) -> Iterator[bytes]:
    """``payload`` cut into pieces of a fixed size, or of seeded random sizes (``"random"``)."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(payload):
        n = len(payload) if mode == "whole" else rng.randint(1, 97) if mode == "random" else int(mode)
        yield payload[pos : pos + n]
        pos += n


def fed(
    payload: bytes, chunks: Iterator[bytes] | list[bytes], spool: SpoolPolicy | None = None
) -> tuple[StateDecoder, RunningCheck]:
    dec = StateDecoder(spool=spool)
    check = RunningCheck(dec)
    assert dec.on_data is check
    for c in chunks:
        dec.feed(c)
    assert dec.received == len(payload)
    return dec, check


def reference_norm(state: AdapterState) -> float:
    """The global L2 norm computed independently: every floating value squared in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in state.tensors.values() if t.is_floating_point()))


def data_start(payload: bytes) -> int:
    return 8 + struct.unpack("<Q", payload[:8])[0]


@pytest.mark.parametrize("mode", [1, 3, 7, 13, 97, 4099, "random", "whole"])
def test_norm_matches_check_update_for_any_piece_sizes(mode: str | int) -> None:
    state = mixed_state()
    payload = encode_state(state)
    dec, check = fed(payload, pieces(payload, mode, seed=11))
    decoded = dec.finish()
    norm = check.result()
    assert math.isclose(norm, check_update(decoded), rel_tol=1e-9)
    assert math.isclose(norm, reference_norm(state), rel_tol=1e-9)
    assert norm > 0


def large_state() -> AdapterState:
    """Tensors of many 1,024-value rows (more than one 1M-value slice, sizes off the row grid), and
    float32 values whose rows overflow float32 although every value and the norm are finite."""
    g = torch.Generator().manual_seed(7)
    t = OrderedDict()
    t["f32"] = torch.randn((1 << 20) + 3 * 1024 + 5, generator=g) * torch.rand(1, generator=g)
    t["bf16"] = (torch.randn(70_001, generator=g) * 40).bfloat16()
    t["f16"] = (torch.randn(5_000, generator=g) * 2e3).half()  # squares far beyond float16's range
    t["f32_huge"] = torch.full((2_048 + 1,), 3e19)
    t["f64"] = torch.randn(3_000, generator=g, dtype=torch.float64)
    return AdapterState(t, {})


@pytest.mark.parametrize("piece", [(4 << 20) + 3, 65_537])
def test_large_tensors_norm_within_1e6_of_float64(piece: int) -> None:
    state = large_state()
    payload = encode_state(state)
    dec, check = fed(payload, pieces(payload, piece))
    want = reference_norm(state)
    assert math.isfinite(want)
    assert math.isclose(check_update(dec.finish()), want, rel_tol=1e-6)
    assert math.isclose(check.result(), want, rel_tol=1e-6)
    bad = OrderedDict(state.tensors)
    bad["f32"] = bad["f32"].clone()
    bad["f32"][(1 << 20) + 17] = float("nan")  # in the second slice
    payload = encode_state(AdapterState(bad, {}))
    dec, check = fed(payload, pieces(payload, piece))
    for run in (check.result, lambda: check_update(dec.finish())):
        with pytest.raises(RejectedUpdate, match=r"tensor f32 has NaN"):
            run()


@pytest.mark.parametrize("seed", range(4))
def test_random_pieces_and_spooled_decoder_agree(seed: int, tmp_path: Path) -> None:
    state = mixed_state(seed)
    payload = encode_state(state)
    mem_dec, mem_check = fed(payload, pieces(payload, "random", seed))
    spool_dec, spool_check = fed(payload, pieces(payload, "random", seed + 100), SpoolPolicy(threshold=0, directory=tmp_path))
    assert spool_dec.spooled and not mem_dec.spooled
    spooled = spool_dec.finish()
    assert isinstance(spooled, SpooledState)
    want = check_update(mem_dec.finish())
    assert math.isclose(mem_check.result(), want, rel_tol=1e-9)
    assert math.isclose(spool_check.result(), want, rel_tol=1e-9)
    assert math.isclose(check_update(spooled), want, rel_tol=1e-9)


def three(dtype: torch.dtype, bad_second: float | None = None, bad_third: float | None = None, at: int = 5) -> AdapterState:
    g = torch.Generator().manual_seed(1)
    second = torch.randn(17, generator=g).to(dtype)
    third = torch.randn(9, generator=g)
    if bad_second is not None:
        second[at] = bad_second
    if bad_third is not None:
        third[0] = bad_third
    return AdapterState(OrderedDict([("first", torch.randn(10, generator=g)), ("second", second), ("third", third)]), {})


def expect_rejected(check: RunningCheck, decoded: AdapterState, name: str) -> None:
    with pytest.raises(RejectedUpdate, match=rf"\(non_finite\): tensor {name} has NaN or Inf") as got:
        check.result()
    assert got.value.reason == "non_finite"
    with pytest.raises(RejectedUpdate, match=rf"tensor {name} has NaN or Inf"):
        check_update(decoded)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("mode", [1, 3, 5, "random", "whole"])
def test_non_finite_names_the_first_bad_tensor(dtype: torch.dtype, bad: str, mode: str | int) -> None:
    state = three(dtype, bad_second=BAD[bad], bad_third=float("nan"))  # the third is bad too: the first one is named
    payload = encode_state(state)
    dec, check = fed(payload, pieces(payload, mode, seed=3))
    expect_rejected(check, dec.finish(), "second")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("cut", [1, "mid", -1])
def test_non_finite_element_split_between_pieces(dtype: torch.dtype, bad: str, cut: int | str, tmp_path: Path) -> None:
    """The bad element's bytes arrive in two pieces (cut after its first byte, mid-way, before its last)."""
    at = 6
    state = three(dtype, bad_second=BAD[bad], at=at)
    payload = encode_state(state)
    size = torch.empty((), dtype=dtype).element_size()
    start = data_start(payload) + 10 * 4 + at * size  # "first" holds 10 float32
    split = start + (size // 2 if cut == "mid" else int(cut) % size)
    assert start < split < start + size
    for spool in (None, SpoolPolicy(threshold=0, directory=tmp_path)):
        dec, check = fed(payload, [payload[:split], payload[split:]], spool)
        expect_rejected(check, dec.finish(), "second")
    # the same element split into single bytes, the rest in one piece each side
    dec, check = fed(
        payload, [payload[:start], *(payload[i : i + 1] for i in range(start, start + size)), payload[start + size :]]
    )
    expect_rejected(check, dec.finish(), "second")


@pytest.mark.parametrize("mode", [1, 3, "whole"])
def test_a_finite_payload_with_a_bad_tensor_later_names_only_that_one(mode: str | int) -> None:
    state = three(torch.float32, bad_third=float("-inf"))
    payload = encode_state(state)
    dec, check = fed(payload, pieces(payload, mode))
    expect_rejected(check, dec.finish(), "third")


def test_integer_tensors_never_count() -> None:
    """Integer tensors whose bytes would read as NaN/Inf floats are neither rejected nor summed."""
    nan32, inf32 = struct.unpack("<ii", struct.pack("<ff", float("nan"), float("inf")))
    nan16 = struct.unpack("<h", struct.pack("<e", float("nan")))[0]
    ints = OrderedDict(
        [
            ("i32", torch.tensor([nan32, inf32, -inf32 - 1], dtype=torch.int32)),
            ("i16", torch.tensor([nan16, nan16], dtype=torch.int16)),
            ("u8", torch.full((7,), 0xFF, dtype=torch.uint8)),  # 0xFFFF.. reads as NaN in every float width
            ("i64", torch.full((3,), -1, dtype=torch.int64)),
            ("b", torch.tensor([True, False])),
        ]
    )
    payload = encode_state(AdapterState(ints, {}))
    for mode in (1, 3, "whole"):
        dec, check = fed(payload, pieces(payload, mode))
        assert check.result() == 0.0 == check_update(dec.finish())
    mixed = OrderedDict(ints)
    mixed["w"] = torch.tensor([3.0, 4.0])
    mixed.move_to_end("w", last=False)
    payload = encode_state(AdapterState(mixed, {}))
    dec, check = fed(payload, pieces(payload, 3))
    assert check.result() == 5.0 == check_update(dec.finish())


def test_empty_and_header_only_payloads() -> None:
    for tensors in (OrderedDict(), OrderedDict([("e", torch.empty(0)), ("z", torch.empty(0, 4).half())])):
        payload = encode_state(AdapterState(tensors, {}))
        dec, check = fed(payload, pieces(payload, 1))
        assert check.result() == 0.0 == check_update(dec.finish())


def test_huge_finite_float64_values_give_the_same_infinite_norm() -> None:
    """Finite values whose squares overflow float64: not non_finite, and the same (infinite) norm as check_update."""
    state = AdapterState(OrderedDict([("a", torch.tensor([1e200, 2.0], dtype=torch.float64))]), {})
    payload = encode_state(state)
    dec, check = fed(payload, pieces(payload, 3))
    assert check.result() == check_update(dec.finish()) == math.inf


# -- the upload path (what the gRPC servicer runs on every PushUpdate) --------------------------


def upload_of(codecs: RunCodecs, state: AdapterState, chunk: int = 7) -> tuple[Upload, bytes]:
    payload = codecs.encode_update(0, state)
    up = Upload(UpdateHeader("w", "s", "t", 0, 1, {}, len(payload)), codecs.update_decoder(state.schema()))
    for c in pieces(payload, chunk):
        up.decoder.feed(c)
    return up, payload


def test_plain_upload_norm_is_the_running_one() -> None:
    state = mixed_state(5)
    up, _ = upload_of(RunCodecs.from_spec(CodecSpec()), state)
    assert isinstance(up.content, RunningCheck)
    decoded, norm = up.complete(None)
    assert math.isclose(norm, check_update(decoded), rel_tol=1e-9)
    with pytest.raises(RejectedUpdate, match=r"\(norm\)"):
        upload_of(RunCodecs.from_spec(CodecSpec()), state)[0].complete(norm / 2)
    bad, _ = upload_of(RunCodecs.from_spec(CodecSpec()), three(torch.bfloat16, bad_second=float("inf")))
    with pytest.raises(RejectedUpdate, match=r"\(non_finite\): tensor second"):
        bad.complete(None)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "topk+int8"])
def test_codec_upload_is_checked_once_decoded(spec: str) -> None:
    """A codec's wire form is not the update: its norm and finiteness are those of the decoded state."""
    codecs = RunCodecs.from_spec(CodecSpec(up=spec, options={"fraction": 0.5, "block_size": 16}), error_feedback=False)
    g = torch.Generator().manual_seed(2)
    state = AdapterState(OrderedDict([("a", torch.randn(40, generator=g) * 5), ("b", torch.randn(3, 8, generator=g))]), {})
    up, _ = upload_of(codecs, state)
    decoded, norm = up.complete(None)
    assert norm > 1 and math.isclose(norm, check_update(decoded), rel_tol=1e-9)
    with pytest.raises(RejectedUpdate, match=r"\(norm\)"):
        upload_of(codecs, state)[0].complete(norm / 2)


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_codec_upload_with_nan_is_refused(spec: str) -> None:
    codecs = RunCodecs.from_spec(CodecSpec(up=spec), error_feedback=False)
    up, _ = upload_of(codecs, three(torch.float32, bad_second=float("nan")))
    with pytest.raises(RejectedUpdate, match=r"\(non_finite\): tensor second has NaN or Inf"):
        up.complete(None)
