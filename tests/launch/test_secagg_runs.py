"""Secure aggregation end to end: `dpeft simulate` with and without it gives the same global
adapter to within the quantisation step, and a `dpeft coordinator` with worker processes over
gRPC finishes deadline rounds in which a client drops out after masking its update."""

from __future__ import annotations

import sys
from pathlib import Path

import integration_testlib
import pytest
import torch
from integration_testlib import assert_no_traceback, free_port, overrides, read_metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

RUN = dict(
    rounds=2,
    clients=4,
    clients_per_round=3,
    train__local_steps=2,
    train__batch_size=8,
    data__max_train_examples=80,
    data__test_examples=8,
    model__max_length=16,
    simulate__processes=1,
)
ON = "privacy.secure_aggregation=true"


def _checkpoint(run: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"round-{r:06d}.safetensors"))


def test_simulate_same_adapter_as_without(tmp_path: Path, procs) -> None:
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    rc, p = procs.run("simulate", *overrides(plain, **RUN), timeout=240)
    assert rc == 0, p.stderr
    rc, p = procs.run("simulate", *overrides(secure, **RUN), ON, timeout=240)
    assert rc == 0, p.stderr
    assert_no_traceback(p.stderr)
    rows, base = read_metrics(secure), read_metrics(plain)
    for r, b in zip(rows[1:], base[1:], strict=True):
        assert r["sampled"] == b["sampled"] and r["clients"] == 3 and r["num_examples"] == b["num_examples"]
        assert r["secagg_dropped"] == 0 and r["secagg_left_out"] == 0
        assert r["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
    # round 1 starts from the same global: the aggregates differ by at most half a step per client over the total weight
    bound = 3 * 0.5 * rows[1]["secagg_step"] / rows[1]["num_examples"] + 1e-6
    a, s = _checkpoint(plain, 1), _checkpoint(secure, 1)
    assert set(a) == set(s)
    diff = max((a[k].double() - s[k].double()).abs().max().item() for k in a)
    assert diff <= bound, (diff, bound)
    # round 2 trains from those (Adam magnifies tiny differences a little): still the same adapter
    a, s = _checkpoint(plain, 2), _checkpoint(secure, 2)
    assert max((a[k].double() - s[k].double()).abs().max().item() for k in a) < 2e-4
    assert max(a[k].abs().max().item() for k in a) > 1e-2
    assert not any("key" in f.name or "secagg" in f.name for f in secure.rglob("*"))  # no key material in the run directory


def test_coordinator_workers_deadline_dropout_after_masking(tmp_path: Path, procs, monkeypatch) -> None:
    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    args = [a for a in overrides(run, **RUN) if not a.startswith("simulate.processes")]
    extra = [
        ON,
        "sync.name=deadline",
        "sync.over_selection=1.34",
        "sync.deadline_s=120",
        "simulate.speed_factors=[1,1,1,60]",
        "data.partition=iid",
        "sync.min_workers=2",  # both workers in before round 1, or the first may finish the run alone
    ]
    coord = procs.start("coordinator", "--listen", address, *args, *extra)
    monkeypatch.setattr(integration_testlib, "DPEFT", [sys.executable, str(Path(__file__).with_name("secagg_slow_worker.py"))])
    workers = [procs.start(address, f"w{i}") for i in range(2)]
    rc = coord.wait(300)
    assert rc == 0, coord.stderr
    assert_no_traceback(coord.stderr)
    for w in workers:
        assert w.wait(60) == 0, w.stderr
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        # 4 clients masked, the quorum of 3 closed the round, client 3 (60x slow) dropped after masking
        assert r["sampled"] == [0, 1, 2, 3] and r["clients"] == 3
        assert r["secagg_dropped"] == 1 and r["secagg_left_out"] == 0
        assert r["num_examples"] == 60  # 20 iid examples each for the three survivors
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_central_dp_under_secure_aggregation_releases_the_plain_noisy_mean(tmp_path: Path, procs, monkeypatch) -> None:
    """Central DP over a masked sum adds the same seeded noise to the same clipped sum as central
    DP over plain updates: the two runs' globals agree to the quantisation step, and both charge
    the accountant the same epsilon."""
    monkeypatch.setenv("DPEFT_DP_NOISE_SECRET", "test-only-secret")  # the same noise draw in both runs
    dp = ["privacy.mode=central", "privacy.clipping=client", "privacy.clip_norm=0.5", "privacy.noise_multiplier=0.3", "privacy.delta=1e-3"]
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    run = dict(RUN, rounds=1)
    rc, p = procs.run("simulate", *overrides(plain, **run), *dp, timeout=240)
    assert rc == 0, p.stderr
    rc, p = procs.run("simulate", *overrides(secure, **run), *dp, ON, timeout=240)
    assert rc == 0, p.stderr
    assert_no_traceback(p.stderr)
    rows, base = read_metrics(secure), read_metrics(plain)
    assert rows[1]["epsilon"] == pytest.approx(base[1]["epsilon"]) and rows[1]["epsilon"] > 0
    assert rows[1]["dp_noise_std"] == pytest.approx(base[1]["dp_noise_std"]) and rows[1]["dp_noise_std"] > 0
    a, s = _checkpoint(plain, 1), _checkpoint(secure, 1)
    start = _checkpoint(plain, 0) if (plain / "checkpoints" / "round-000000.safetensors").exists() else None
    # clipped updates (weight 1) are summed to within half a step each, then divided by clients_per_round
    bound = 3 * 0.5 * rows[1]["secagg_step"] / 3 + 1e-6
    diff = max((a[k].double() - s[k].double()).abs().max().item() for k in a)
    assert diff <= bound, (diff, bound)
    if start is not None:  # the noise moved the global by far more than the quantisation step
        assert max((a[k].double() - start[k].double()).abs().max().item() for k in a) > 100 * bound
