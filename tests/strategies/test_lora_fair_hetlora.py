"""LoRA-FAIR and HetLoRA against direct implementations of their formulas, written here on small tensors."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from strategy_testlib import client_factors, lora_state, make, run_round

from dpeft.config import StrategyConfig
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.rank_prune import RankPrune, prune_update, task_penalty
from dpeft.validate import load_config

MODULES = {"m1": (6, 5, 4), "m2": (3, 7, 4)}  # out, in, r


def _deltas(g: AdapterState, seed: int, scale: float = 0.3) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)) for k, v in g.items()))


# --- LoRA-FAIR ------------------------------------------------------------------------------------


def _fair_direct(
    g: AdapterState, deltas: list[AdapterState], ns: list[int], module: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_bar, B_bar, target) of one module, computed client by client."""
    p = torch.tensor(ns, dtype=torch.float64) / sum(ns)
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    a_k = [g[a_name] + d[a_name] for d in deltas]
    b_k = [g[b_name] + d[b_name] for d in deltas]
    a_bar = sum(w * a for w, a in zip(p, a_k, strict=True))
    b_bar = sum(w * b for w, b in zip(p, b_k, strict=True))
    target = sum(w * (b @ a) for w, a, b in zip(p, a_k, b_k, strict=True))
    return a_bar, b_bar, target  # type: ignore[return-value]


def test_lora_fair_frobenius_matches_ridge_least_squares() -> None:
    g = lora_state(MODULES, plain={"head.weight": (2, 3)})
    deltas, ns, lam = [_deltas(g, s) for s in (1, 2, 3)], [3, 1, 2], 0.05
    new = run_round(
        make("lora_fair", similarity="frobenius", lam=lam),
        g,
        [ClientUpdate(i, d, n) for i, (d, n) in enumerate(zip(deltas, ns, strict=True))],
    )
    for module, (out, _, r) in MODULES.items():
        a_bar, b_bar, target = _fair_direct(g, deltas, ns, module)
        # the ridge problem as one stacked least-squares system, solved by lstsq: [A^T; sqrt(lam) I] dB^T = [(T - B A)^T; 0]
        lhs = torch.cat([a_bar.T, lam**0.5 * torch.eye(r, dtype=torch.float64)])
        rhs = torch.cat([(target - b_bar @ a_bar).T, torch.zeros(r, out, dtype=torch.float64)])
        db = torch.linalg.lstsq(lhs, rhs).solution.T
        assert torch.allclose(new[f"{module}.lora_A.weight"], a_bar, atol=1e-10)  # A is the plain average
        assert torch.allclose(new[f"{module}.lora_B.weight"], b_bar + db, atol=1e-8)
    mean_head = sum(n * d["head.weight"] for d, n in zip(deltas, ns, strict=True)) / sum(ns)
    assert torch.allclose(new["head.weight"], g["head.weight"] + mean_head, atol=1e-10)


def test_lora_fair_lam_zero_fits_the_mean_product_in_the_row_space_of_a() -> None:
    g = lora_state(MODULES)
    deltas = [_deltas(g, s) for s in (4, 5)]
    strategy = make("lora_fair", similarity="frobenius", lam=0.0)
    run_round(strategy, g, [ClientUpdate(i, d, 1) for i, d in enumerate(deltas)])
    assert strategy.last_metrics["lora_fair_residual_after"] < strategy.last_metrics["lora_fair_residual_before"]


def _cos_objective(target: torch.Tensor, b: torch.Tensor, a: torch.Tensor, db: torch.Tensor, lam: float) -> float:
    approx = (b + db) @ a
    return float(
        1 - torch.nn.functional.cosine_similarity(target.flatten(), approx.flatten(), dim=0) + lam * torch.linalg.norm(db)
    )


def test_lora_fair_cosine_lowers_the_papers_objective_to_a_local_minimum() -> None:
    g = lora_state(MODULES)
    deltas, ns, lam = [_deltas(g, s, 2.0) for s in (7, 8, 9)], [1, 1, 2], 0.01
    new = run_round(
        make("lora_fair", lam=lam, steps=3000, step_lr=0.002),
        g,
        [ClientUpdate(i, d, n) for i, (d, n) in enumerate(zip(deltas, ns, strict=True))],
    )
    gen = torch.Generator().manual_seed(0)
    for module in MODULES:
        a_bar, b_bar, target = _fair_direct(g, deltas, ns, module)
        db = new[f"{module}.lora_B.weight"] - b_bar
        found, plain = _cos_objective(target, b_bar, a_bar, db, lam), _cos_objective(target, b_bar, a_bar, 0 * db, lam)
        assert found < plain - 1e-2  # the correction helps
        for _ in range(20):  # and no small step nearby does clearly better
            step = 1e-3 * float(b_bar.norm()) * torch.randn(db.shape, generator=gen, dtype=torch.float64) / db.numel() ** 0.5
            assert _cos_objective(target, b_bar, a_bar, db + step, lam) > found - 1e-4


# --- HetLoRA --------------------------------------------------------------------------------------


def test_hetlora_truncates_pads_and_weights_by_update_norm() -> None:
    g = lora_state({"m1": (6, 5, 8), "m2": (3, 7, 8)}, plain={"head.weight": (2, 3)})
    strategy = make("hetlora", client_ranks=[2, 4, 8])
    sent = strategy.client_state(g, 1)
    assert sent["m1.lora_A.weight"].shape == (4, 5) and torch.equal(sent["m1.lora_A.weight"], g["m1.lora_A.weight"][:4])
    assert torch.equal(sent["m2.lora_B.weight"], g["m2.lora_B.weight"][:, :4])
    assert strategy.client_state(g, 2) is g and strategy.client_key(3) == 2
    ranks, ns = [2, 4, 8], [5, 1, 2]
    updates = [client_factors(g, r, 10 + r) for r in ranks]
    new = run_round(strategy, g, [ClientUpdate(i, u, n) for i, (u, n) in enumerate(zip(updates, ns, strict=True))])
    for m in ("m1", "m2"):
        a_name, b_name = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        padded_a, padded_b, weights = [], [], []
        for u, r in zip(updates, ranks, strict=True):
            a = torch.zeros_like(g[a_name])
            a[:r] = u[a_name]
            b = torch.zeros_like(g[b_name])
            b[:, :r] = u[b_name]
            padded_a.append(a)
            padded_b.append(b)
            weights.append(torch.linalg.norm(u[b_name] @ u[a_name], "fro"))
        z = sum(weights)
        assert torch.allclose(new[a_name], sum(w / z * a for w, a in zip(weights, padded_a, strict=True)), atol=1e-10)
        assert torch.allclose(new[b_name], sum(w / z * b for w, b in zip(weights, padded_b, strict=True)), atol=1e-10)
    head = sum(n * u["head.weight"] for u, n in zip(updates, ns, strict=True)) / sum(ns)  # plain tensors: deltas, by examples
    assert torch.allclose(new["head.weight"], g["head.weight"] + head, atol=1e-10)


def test_hetlora_remembers_pruned_ranks_across_checkpoints() -> None:
    g = lora_state({"m1": (6, 5, 8)})
    strategy = make("hetlora", client_ranks=[8, 4])
    updates = [
        ClientUpdate(0, client_factors(g, 8, 1), 1, {"hetlora_rank": 6.0}),
        ClientUpdate(1, client_factors(g, 4, 2), 1, {"hetlora_rank": 4.0}),
    ]
    run_round(strategy, g, updates)
    assert strategy.last_metrics["hetlora_pruned"] == 1 and strategy.last_metrics["hetlora_rank_mean"] == 5
    assert strategy.client_rank(0) == 6 and strategy.client_rank(1) == 4 and strategy.client_rank(2) == 8
    restored = make("hetlora", client_ranks=[8, 4])
    restored.load_state_dict(strategy.state_dict())
    assert restored.client_state(g, 0)["m1.lora_B.weight"].shape == (6, 6)


def test_rank_prune_penalty_and_pruning_follow_their_definitions() -> None:
    spec = RankPrune(lam=0.5, keep=0.75, threshold=0.2, min_rank=1)
    hp = TaskHyperparams(rank_prune=spec.to_wire()).to_dict()
    assert TaskHyperparams.from_dict(hp).rank_prune == spec.to_wire()
    s = client_factors(lora_state({"m1": (6, 5, 8), "m2": (3, 7, 8)}), 8, 3)
    penalty = task_penalty(hp, s.tensors)
    assert penalty is not None
    direct = sum(torch.linalg.norm(s[f"{m}.lora_B.weight"][:, 6:] @ s[f"{m}.lora_A.weight"][6:], "fro") for m in ("m1", "m2"))
    assert float(penalty(s.tensors)) == pytest.approx(0.5 * float(direct), rel=1e-5)
    kept, metrics = prune_update(hp, s)  # random factors: the tail holds about a quarter of the energy
    assert metrics["hetlora_rank"] == 8 and torch.equal(kept["m1.lora_A.weight"], s["m1.lora_A.weight"])
    faded = s.clone()
    for m in ("m1", "m2"):
        faded.tensors[f"{m}.lora_B.weight"][:, 6:] *= 1e-3
    pruned, metrics = prune_update(hp, faded)
    assert metrics["hetlora_rank"] == 6 and metrics["hetlora_tail_share"] < 0.2
    assert not pruned["m1.lora_A.weight"][6:].any() and not pruned["m2.lora_B.weight"][:, 6:].any()
    assert torch.equal(pruned["m1.lora_A.weight"][:6], s["m1.lora_A.weight"][:6])


# --- options and config checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("lora_fair", {"lam": -1}, "lam"),
        ("lora_fair", {"similarity": "l1"}, "similarity"),
        ("lora_fair", {"steps": 0}, "steps"),
        ("lora_fair", {"solver": "lbfgs"}, "solver"),
        ("hetlora", {"prune_rule": "never"}, "prune_rule"),
        ("hetlora", {"prune_keep": 1.0}, "prune_keep"),
        ("hetlora", {"prune_threshold": 2}, "prune_threshold"),
        ("hetlora", {"weighting": "rank"}, "weighting"),
        ("hetlora", {"clip_norm": 1.0}, "clip_norm"),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_strategy(StrategyConfig(name=name, options=options))
    assert e.value.key == f"strategy.options.{key}"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["strategy.name=hetlora", "strategy.options={client_ranks: [4, 16]}", "adapter.r=8"], "strategy.options.client_ranks"),
        (["strategy.name=hetlora", "privacy.secure_aggregation=true"], "privacy.secure_aggregation"),
        (["strategy.name=lora_fair", "privacy.secure_aggregation=true"], "privacy.secure_aggregation"),
        (["strategy.name=lora_fair", "adapter.method=ia3"], "strategy.name"),
        (["strategy.name=hetlora", "aggregation=allreduce"], "strategy.name"),
        (["strategy.name=lora_fair", "aggregation=allreduce"], "strategy.name"),
    ],
)
def test_run_config_refusals_name_the_key(tmp_path, overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run_dir={tmp_path}", *overrides])
    assert e.value.key == key
