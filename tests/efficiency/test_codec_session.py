"""Update codecs as a run uses them: packed uploads, streaming decode, error feedback on disk."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dpeft.codec import encode_state
from dpeft.codec.tensors import StateDecoder
from dpeft.codec.updates import RunCodecs, make_codec
from dpeft.codec.updates.packed import PACK_KEY
from dpeft.errors import ProtocolError
from dpeft.state import AdapterState


def _delta(seed: int = 0, scale: float = 1.0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    t = OrderedDict(
        [
            ("layer.0.lora_A.weight", torch.randn(8, 96, generator=g) * scale),
            ("layer.0.lora_B.weight", torch.randn(96, 8, generator=g) * scale),
            ("classifier.weight", torch.randn(2, 96, generator=g) * scale),
            ("classifier.bias", torch.randn(2, generator=g) * scale),
        ]
    )
    return AdapterState(t, {"round": 1, "client_id": 0, "kind": "delta"})


def _roundtrip(rc: RunCodecs, delta: AdapterState, client: int = 0, chunk: int = 1000) -> tuple[AdapterState, int]:
    payload = rc.encode_update(client, delta)
    dec = rc.update_decoder(delta.schema())
    for i in range(0, len(payload), chunk):
        dec.feed(payload[i : i + chunk])
    return dec.finish(), len(payload)


@pytest.mark.parametrize("spec", ["fp32", "fp16", "bf16", "int8", "topk", "topk+int8"])
def test_roundtrip_and_size(spec: str) -> None:
    d = _delta()
    rc = RunCodecs(make_codec(spec, {"fraction": 0.1} if "topk" in spec else {}), make_codec("fp32"), error_feedback=False)
    out, size = _roundtrip(rc, d)
    assert list(out.tensors) == list(d.tensors) and out.meta["client_id"] == 0
    plain = len(encode_state(d))
    for k in d.tensors:
        assert out[k].shape == d[k].shape and out[k].dtype == d[k].dtype
        if spec in ("fp32",):
            assert torch.equal(out[k], d[k])
        elif spec in ("fp16", "bf16", "int8"):
            bound = {"fp16": 2**-10, "bf16": 2**-7, "int8": 1 / 127}[spec] * float(d[k].abs().max())
            assert float((out[k] - d[k]).abs().max()) <= bound * 1.01
    if spec == "int8":  # one byte per value, one fp32 scale per block, a small fixed header
        numel = sum(t.numel() for t in d.tensors.values())
        blocks = sum(-(-t.numel() // 256) for t in d.tensors.values())
        assert size <= numel + 4 * blocks + 400, (plain, size)
    if spec == "fp32":
        assert size == plain


def test_packed_update_rejects_other_layouts() -> None:
    d = _delta()
    rc = RunCodecs(make_codec("int8"), make_codec("fp32"), error_feedback=False)
    payload = rc.encode_update(0, d)
    other = OrderedDict(d.schema())
    other["classifier.bias"] = ((3,), torch.float32)
    dec = rc.update_decoder(other)
    with pytest.raises(ProtocolError):  # sizes differ: the header check fails before allocating
        dec.feed(payload)
        dec.finish()
    # same sizes, other codec params: the packed record does not match
    rc2 = RunCodecs(make_codec("int8", {"block_size": 256}), make_codec("fp32"), error_feedback=False)
    rc3 = RunCodecs(make_codec("int8", {"block_size": 255}), make_codec("fp32"), error_feedback=False)
    with pytest.raises(ProtocolError):
        dec = rc3.update_decoder(d.schema())
        dec.feed(rc2.encode_update(0, d))
        dec.finish()
    # a tampered layout digest
    wire = StateDecoder().__class__()
    wire.feed(payload)
    st = wire.finish()
    st.meta[PACK_KEY] = dict(st.meta[PACK_KEY], layout="0" * 32)
    dec = rc.update_decoder(d.schema())
    dec.feed(encode_state(st))
    with pytest.raises(ProtocolError, match="layout"):
        dec.finish()
    # an int8 value of -128 is still caught by the codec's content check
    st = StateDecoder()
    st.feed(payload)
    bad = st.finish()
    q = bad.tensors["packed::I8"].clone()
    q[0] = -128
    bad.tensors["packed::I8"] = q
    dec = rc.update_decoder(d.schema())
    dec.feed(encode_state(bad))
    with pytest.raises(ProtocolError):
        dec.finish()


def test_error_feedback_on_disk_converges(tmp_path: Path) -> None:
    rc = RunCodecs(make_codec("topk", {"fraction": 0.05}), make_codec("fp32"), residual_dir=tmp_path / "res")
    total_true = None
    total_sent = None
    for r in range(30):
        d = _delta(seed=r)
        out, _ = _roundtrip(rc, d, client=7)
        total_true = d.clone() if total_true is None else AdapterState(OrderedDict((k, total_true[k] + d[k]) for k in d.tensors))
        total_sent = out if total_sent is None else AdapterState(OrderedDict((k, total_sent[k] + out[k]) for k in d.tensors))
    files = list((tmp_path / "res").glob("c-*.safetensors"))
    assert len(files) == 1
    residual = rc.feedback.residual("7")
    for k in total_true.tensors:  # sent + residual == true sum, exactly up to fp32 rounding
        assert torch.allclose(total_sent[k] + residual[k], total_true[k], atol=1e-4)
    # without feedback, top-5% drops most of the signal; with it the gap is only the residual
    gap = sum(float((total_true[k] - total_sent[k]).norm()) for k in total_true.tensors)
    scale = sum(float(total_true[k].norm()) for k in total_true.tensors)
    assert gap < scale


def test_lossless_codec_has_no_feedback(tmp_path: Path) -> None:
    rc = RunCodecs(make_codec("fp32"), make_codec("fp32"), residual_dir=tmp_path / "res")
    assert rc.feedback is None
    _roundtrip(rc, _delta())
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("down", ["fp32", "fp16", "int8"])
def test_global_down_codec(down: str) -> None:
    g = _delta(3)
    g.meta = {"round": 4}
    rc = RunCodecs(make_codec("fp32"), make_codec(down), error_feedback=False)
    payload = rc.encode_global(g)
    back = rc.decode_global(payload)
    assert list(back.tensors) == list(g.tensors) and back.meta["round"] == 4
    tol = {"fp32": 0.0, "fp16": 2e-3, "int8": 0.02}[down]
    for k in g.tensors:
        assert float((back[k] - g[k]).abs().max()) <= tol * float(g[k].abs().max()) + 1e-12
    if down == "fp32":
        assert payload == encode_state(g)
    else:
        with pytest.raises(ProtocolError):
            RunCodecs(make_codec("fp32"), make_codec("fp32")).decode_global(payload)


def test_config_section_names_the_key() -> None:
    from dpeft.errors import ConfigError
    from dpeft.validate import load_config

    cfg = load_config(None, ["codec.up=topk+int8", "codec.options={fraction: 0.1}"])
    rc = RunCodecs.from_config(cfg)
    assert rc.up.name == "topk+int8" and rc.error_feedback and rc.residual_dir == Path(cfg.run_dir) / "residuals"
    for args, key in [(["codec.up=int9"], "codec.up"), (["codec.down=int8+topk"], "codec.down"), (["codec.options={blocksize: 3}"], "codec.up")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, args)
        assert info.value.key == key


def test_clear_residuals(tmp_path: Path) -> None:
    rc = RunCodecs(make_codec("int8"), make_codec("fp32"), residual_dir=tmp_path / "res")
    assert rc.clear_residuals() == 0
    _roundtrip(rc, _delta(), client=1)
    _roundtrip(rc, _delta(), client=2)
    assert sorted(rc.feedback.store.clients()) == ["1", "2"]
    (tmp_path / "res" / "keep.txt").write_text("not a residual")
    assert rc.clear_residuals() == 2
    assert rc.feedback.store.clients() == [] and (tmp_path / "res" / "keep.txt").exists()
