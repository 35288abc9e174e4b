"""Error feedback: decoded updates add up to the true deltas; residual stores in RAM and on disk."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dpeft.codec.tensors import encode_state
from dpeft.codec.updates import (
    DiskResidualStore,
    ErrorFeedback,
    MemoryResidualStore,
    ResidualStore,
    TopKCodec,
    decode_update,
    make_codec,
)
from dpeft.state import AdapterState

OPTS = {"fraction": 0.05, "block_size": 16}


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ResidualStore:
    return MemoryResidualStore() if request.param == "memory" else DiskResidualStore(tmp_path / "residuals")


def delta_state(seed: int = 0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 0, 60)  # magnitudes over three decades: small ones need feedback
    return AdapterState(
        OrderedDict(
            w=(torch.randn(60, generator=g) * scales).reshape(6, 10),
            h=torch.randn(4, 5, generator=g).to(torch.bfloat16),
            e=torch.zeros(0, 3),
            z=torch.zeros(5),
            n=torch.tensor([1, 2]),
        ),
        {"round": 0},
    )


def run_rounds(ef: ErrorFeedback, client: str, delta: AdapterState, rounds: int) -> dict[str, torch.Tensor]:
    """Sum (float64) of what the receiver decodes from the real wire over ``rounds`` rounds."""
    schema = delta.schema()
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in delta.items() if t.dtype.is_floating_point}
    for _ in range(rounds):
        got = decode_update(ef.codec, encode_state(ef.encode(client, delta)), schema)
        assert torch.equal(got["n"], delta["n"])
        for n in total:
            total[n] += got[n].double()
    return total


def amax(t: torch.Tensor) -> float:
    """Largest |element| (0 for an empty tensor)."""
    return float(t.abs().max()) if t.numel() else 0.0


@pytest.mark.parametrize("spec", ["topk", "int8", "topk+int8", "topk+fp16", "bf16"])
def test_sum_of_sent_tracks_sum_of_deltas(spec: str, store: ResidualStore) -> None:
    """Same constant delta every round: the decoded updates add up to rounds * delta."""
    delta = delta_state()
    ef = ErrorFeedback(make_codec(spec, OPTS), store)
    mean_errs = []
    for rounds in (100, 200):
        ef.reset("c1")
        total = run_rounds(ef, "c1", delta, rounds)
        res = ef.residual("c1")
        assert res is not None and set(res) == {"w", "h", "e", "z"}
        for n, t in total.items():
            truth = delta[n].double() * rounds
            # conservation: what was sent plus what is still owed is what was produced
            assert torch.allclose(t + res[n].double(), truth, rtol=1e-5, atol=1e-4), (spec, n)
            # the residual stays bounded: topk owes at most numel/k rounds of a delta entry
            k = TopKCodec(OPTS["fraction"]).k_for(t.numel())
            factor = t.numel() / k if "topk" in spec and k else 1.0
            assert amax(res[n]) <= factor * amax(delta[n].double()) + 1e-6, (spec, n, rounds)
        mean_errs.append(max(amax(total[n] / rounds - delta[n].double()) for n in total))
    # ... so the average decoded update converges to the true delta like 1/rounds
    assert mean_errs[1] <= 0.6 * mean_errs[0] + 1e-4, (spec, mean_errs)
    assert mean_errs[1] <= 0.1


def test_without_feedback_topk_loses_small_entries() -> None:
    delta = delta_state()
    codec = make_codec("topk", OPTS)
    sent = codec.decode(codec.encode(delta), delta.schema())
    lost = (sent["w"] == 0) & (delta["w"] != 0)
    assert int(lost.sum()) == 60 - 3  # every round drops the same 57 entries for good
    rounds = 200
    no_ef_err = amax(sent["w"].double() * rounds - delta["w"].double() * rounds)  # grows with rounds
    total = run_rounds(ErrorFeedback(codec), "c", delta, rounds)
    ef_err = amax(total["w"] - delta["w"].double() * rounds)  # bounded by the residual
    assert ef_err < no_ef_err / 10
    assert int((total["w"] != 0).sum()) > 30, "with feedback the smaller entries get through too"


def test_fp32_leaves_no_residual(store: ResidualStore) -> None:
    ef = ErrorFeedback(make_codec("fp32"), store)
    delta = delta_state()
    ef.encode("c", delta)
    res = ef.residual("c")
    assert res is not None
    assert all(amax(r) == 0 for r in res.values())
    assert res["h"].dtype == torch.float32  # accumulated in fp32 even for bf16 deltas


def test_clients_are_independent(store: ResidualStore) -> None:
    ef = ErrorFeedback(make_codec("topk+int8", OPTS), store)
    a, b = delta_state(1), delta_state(2)
    ef.encode("a", a)
    ef.encode("b", b)
    ra, rb = ef.residual("a"), ef.residual("b")
    assert ra is not None and rb is not None and not torch.equal(ra["w"], rb["w"])
    assert store.clients() == ["a", "b"]
    ef.reset("a")
    assert ef.residual("a") is None and store.clients() == ["b"]
    ef.reset("a")  # no error when nothing is stored


def test_residual_for_another_adapter_is_discarded(store: ResidualStore) -> None:
    ef = ErrorFeedback(make_codec("topk", OPTS), store)
    ef.encode("c", AdapterState(OrderedDict(w=torch.randn(50))))
    wire = ef.encode("c", AdapterState(OrderedDict(w=torch.randn(60), v=torch.randn(3))))
    assert wire["w::idx"].numel() == 3
    res = ef.residual("c")
    assert res is not None and res["w"].shape == (60,) and set(res) == {"w", "v"}


def test_memory_store_copies() -> None:
    s = MemoryResidualStore()
    t = torch.ones(3)
    s.put("c", {"w": t})
    t += 1
    got = s.get("c")
    assert got is not None and got["w"].tolist() == [1, 1, 1]
    got["w"] += 5
    again = s.get("c")
    assert again is not None and again["w"].tolist() == [1, 1, 1]


def test_disk_store_files_and_persistence(tmp_path: Path) -> None:
    ids = ["client-1", "../etc/passwd", "ünï/\\:*?", "x" * 500, ""]
    s = DiskResidualStore(tmp_path)
    for i, cid in enumerate(ids):
        s.put(cid, OrderedDict(w=torch.full((2, 3), float(i)), e=torch.zeros(0, 4), s=torch.tensor(1.5)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == len(ids) and all(f.startswith("c-") and f.endswith(".safetensors") for f in files)
    assert all(len(f) < 255 for f in files)
    again = DiskResidualStore(tmp_path)  # a fresh process sees the same residuals
    assert again.clients() == sorted(ids)
    for i, cid in enumerate(ids):
        got = again.get(cid)
        assert got is not None and got["w"].tolist() == [[float(i)] * 3] * 2
        assert got["e"].shape == (0, 4) and got["s"].shape == () and float(got["s"]) == 1.5
    s.put("client-1", {})
    assert s.get("client-1") == OrderedDict()
    s.delete("client-1")
    assert s.get("client-1") is None and "client-1" not in s.clients()
    assert s.get("never") is None
