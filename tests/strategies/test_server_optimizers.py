"""FedAvgM and FedAdam/FedYogi/FedAdagrad against direct formulas; checkpointing of moments."""

from __future__ import annotations

import math

import pytest
import torch
from strategy_testlib import close, make, random_like, run_round, state, upd

from dpeft.state import AdapterState


def test_fedavgm_hand_computed() -> None:
    s = make("fedavgm", server_lr=1.0, momentum=0.5)
    x0 = state(w=[0.0, 0.0])
    x1 = run_round(s, x0, [upd(0, state(w=[1.0, 2.0]))])  # m = d1
    assert close(x1["w"], torch.tensor([1.0, 2.0]))
    x2 = run_round(s, x1, [upd(0, state(w=[1.0, 0.0]))])  # m = 0.5 * [1, 2] + [1, 0] = [1.5, 1]
    assert close(x2["w"], torch.tensor([2.5, 3.0]))


def test_fedavgm_zero_momentum_is_fedavg() -> None:
    g = state(w=[1.0, 2.0])
    ups = [upd(0, state(w=[0.5, -1.0]), 3), upd(1, state(w=[1.0, 1.0]), 1)]
    a = run_round(make("fedavgm", server_lr=0.3, momentum=0.0), g, ups)
    assert close(a["w"], run_round(make("fedavg", server_lr=0.3), g, ups)["w"])


def test_fedadam_single_step_scalar() -> None:
    s = make("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = run_round(s, state(w=[1.0]), [upd(0, state(w=[0.1]))])
    m = 0.1 * 0.1
    v = 0.99 * 1e-6 + 0.01 * 0.01
    assert math.isclose(float(new["w"]), 1.0 + 0.1 * m / (math.sqrt(v) + 1e-3), rel_tol=1e-6)


def reference(kind: str, deltas: list[torch.Tensor], x0: torch.Tensor, eta: float, b1: float, b2: float, tau: float):
    """Reddi et al. Algorithm 2, written out directly."""
    x, m, v = x0.double().clone(), torch.zeros_like(x0, dtype=torch.float64), torch.full_like(x0, tau**2, dtype=torch.float64)
    xs = []
    for d in deltas:
        d = d.double()
        m = b1 * m + (1 - b1) * d
        if kind == "fedadagrad":
            v = v + d**2
        elif kind == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * torch.sign(v - d**2)
        x = x + eta * m / (v.sqrt() + tau)
        xs.append(x.clone())
    return xs


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_against_direct_formula(kind: str) -> None:
    b1, b2, tau, eta = 0.8, 0.95, 1e-2, 0.05
    opts = {"beta1": b1, "tau": tau} | ({} if kind == "fedadagrad" else {"beta2": b2})
    s = make(kind, server_lr=eta, **opts)
    g = AdapterState({"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)})
    rounds = [[random_like(g, 10 * r + c, 0.1) for c in range(3)] for r in range(4)]
    weights = [1, 2, 5]
    x = g
    history = []
    for clients in rounds:
        x = run_round(s, x, [upd(c, d, weights[c]) for c, d in enumerate(clients)])
        history.append(x)
    for name in g.tensors:
        means = [sum(w * d[name] for w, d in zip(weights, clients, strict=True)) / sum(weights) for clients in rounds]
        expected = reference(kind, means, g[name], eta, b1, b2, tau)
        for got, want in zip(history, expected, strict=True):
            assert close(got[name], want, 1e-10)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_moments_round_trip_through_state_dict(kind: str) -> None:
    g = AdapterState({"x.lora_A.weight": torch.randn(2, 3), "head.bias": torch.randn(2)})
    a = make(kind, server_lr=0.1)
    x = g
    for r in range(2):
        x = run_round(a, x, [upd(0, random_like(g, r, 0.1)), upd(1, random_like(g, 100 + r, 0.1), 2)])
    sd = a.state_dict()
    groups = ("m",) if kind == "fedavgm" else ("m", "v")
    assert set(sd) == {f"{grp}/{k}" for grp in groups for k in g.tensors}
    b = make(kind, server_lr=0.1)
    b.load_state_dict(sd)
    nxt = [upd(0, random_like(g, 7, 0.1))]
    ya, yb = run_round(a, x, nxt), run_round(b, x, nxt)
    for k in g.tensors:
        assert torch.equal(ya[k], yb[k])
    # a fresh optimizer (no moments) takes a different step
    yc = run_round(make(kind, server_lr=0.1), x, nxt)
    assert not torch.equal(ya["head.bias"], yc["head.bias"])


def test_state_dict_is_a_copy_and_bad_keys_rejected() -> None:
    s = make("fedadam")
    g = state(w=[1.0])
    run_round(s, g, [upd(0, state(w=[0.5]))])
    sd = s.state_dict()
    sd["m/w"].add_(100.0)
    assert float(s.state_dict()["m/w"]) < 1.0
    with pytest.raises(ValueError):
        s.load_state_dict({"q/w": torch.zeros(1)})
    with pytest.raises(ValueError):
        s.load_state_dict({"w": torch.zeros(1)})
    s.load_state_dict({})
    assert s.state_dict() == {}
