"""Update-norm clipping, generic over strategies."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_testlib import close, lora_state, make, random_like, run_round, state, upd

from dpeft.strategies.clipping import clip_by_global_norm, global_norm


def test_clip_hand_computed() -> None:
    d = state(a=[3.0], b=[0.0, 4.0])  # global norm 5
    clipped, norm = clip_by_global_norm(d, 1.0)
    assert norm == 5.0
    assert close(clipped["a"], torch.tensor([0.6])) and close(clipped["b"], torch.tensor([0.0, 0.8]))
    same, _ = clip_by_global_norm(d, 5.0)
    assert same is d


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32), min_size=1, max_size=8),
    st.floats(min_value=1e-3, max_value=100),
)
def test_clipping_bounds_norm_and_keeps_direction(values: list[float], bound: float) -> None:
    d = state(v=values)
    clipped, norm = clip_by_global_norm(d, bound)
    assert global_norm(clipped) <= bound * (1 + 1e-6)
    if norm <= bound:
        assert torch.equal(clipped["v"], d["v"])
    else:
        assert close(clipped["v"] * (norm / bound), d["v"], 1e-4)


def test_fedavg_with_clip_norm() -> None:
    g = state(w=[0.0, 0.0])
    s = make("fedavg", clip_norm=1.0)
    ups = [upd(0, state(w=[3.0, 4.0])), upd(1, state(w=[0.5, 0.0]))]
    new = run_round(s, g, ups)
    assert close(new["w"], torch.tensor([(0.6 + 0.5) / 2, 0.8 / 2]))
    assert s.last_metrics["clip_count"] == 1.0 and s.last_metrics["clip_max_norm"] == 5.0
    run_round(s, g, [upd(0, state(w=[0.1, 0.0]))])
    assert s.last_metrics["clip_count"] == 0.0  # reset per round


def test_clipping_applies_to_every_strategy_kind() -> None:
    g = lora_state({"m": (4, 3, 2)}, {"head.bias": (2,)})
    ups = [upd(i, random_like(g, i, 10.0)) for i in range(5)]
    for name in ("median", "trimmed_mean", "krum", "fedadam", "fedavgm", "flora", "ffa_lora", "fedsa_lora", "fedprox"):
        clipped = run_round(make(name, clip_norm=0.5), g, ups)
        plain = run_round(make(name), g, ups)
        assert list(clipped.tensors) == list(g.tensors)
        assert not torch.equal(clipped["head.bias"], plain["head.bias"]), name
    # with norms far below the bound, clipping changes nothing
    small = [upd(i, random_like(g, i, 1e-3)) for i in range(5)]
    for name in ("median", "flora", "fedavg"):
        a, b = run_round(make(name, clip_norm=100.0), g, small), run_round(make(name), g, small)
        assert all(torch.equal(a[k], b[k]) for k in g.tensors)
