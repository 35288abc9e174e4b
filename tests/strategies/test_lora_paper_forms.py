"""The papers' forms of LoRA-FAIR and HetLoRA against direct implementations of their formulas on small tensors.

LoRA-FAIR: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025 (arXiv:2411.14961). Eq. 8 is the server's residual problem
``argmin_dB S(dW, (B_bar + dB) A_bar) + lam ||dB||`` with ``S`` the cosine dissimilarity, solved by SGD.
HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv:2401.06432), Section 3: truncation, local rank self-pruning, sparsity-weighted
aggregation (Figure 2). The equation numbers of HetLoRA could not be checked against its text; the
comments name the step instead.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from strategy_testlib import client_factors, lora_state, make, run_round

from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.rank_prune import RankPrune, prune_update

MODULES = {"m1": (6, 5, 4), "m2": (3, 7, 4)}  # out, in, r


def _random(g: AdapterState, seed: int, scale: float) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)) for k, v in g.items()))


def test_lora_fair_sgd_solver_is_gradient_descent_on_eq8() -> None:
    g = lora_state(MODULES, plain={"head.weight": (2, 3)})
    deltas, ns = [_random(g, s, 1.5) for s in (11, 12, 13)], [2, 1, 3]
    lam, lr, steps = 0.01, 0.3, 40
    strategy = make("lora_fair", solver="sgd", lam=lam, step_lr=lr, steps=steps)
    new = run_round(strategy, g, [ClientUpdate(i, d, n) for i, (d, n) in enumerate(zip(deltas, ns, strict=True))])
    p = [n / sum(ns) for n in ns]  # p_k = n_k / n: the clients' example weights
    for module in MODULES:
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a_k = [g[a_name] + d[a_name] for d in deltas]  # the clients' trained factors
        b_k = [g[b_name] + d[b_name] for d in deltas]
        a_bar = sum(w * a for w, a in zip(p, a_k, strict=True))  # FedAvg of A and of B
        b_bar = sum(w * b for w, b in zip(p, b_k, strict=True))
        ideal = sum(w * (b @ a) for w, a, b in zip(p, a_k, b_k, strict=True))  # dW = sum_k p_k B_k A_k
        db = torch.zeros_like(b_bar, requires_grad=True)
        for _ in range(steps):  # Eq. 8 by SGD from dB = 0, S = 1 - cos over the flattened matrices
            approx = (b_bar + db) @ a_bar
            loss = (
                1 - torch.nn.functional.cosine_similarity(ideal.flatten(), approx.flatten(), dim=0) + lam * torch.linalg.norm(db)
            )
            (grad,) = torch.autograd.grad(loss, db)
            db = (db - lr * grad).detach().requires_grad_(True)
        assert torch.allclose(new[a_name], a_bar, atol=1e-12)  # Avg-Initial: clients start from A_bar ...
        assert torch.allclose(new[b_name], b_bar + db.detach(), atol=1e-9)  # ... and B_bar + dB
        before = 1 - torch.nn.functional.cosine_similarity(ideal.flatten(), (b_bar @ a_bar).flatten(), dim=0)
        after = 1 - torch.nn.functional.cosine_similarity(ideal.flatten(), (new[b_name] @ a_bar).flatten(), dim=0)
        assert after < before  # the correction moves B_bar A_bar towards the ideal update
    head = sum(n * d["head.weight"] for d, n in zip(deltas, ns, strict=True)) / sum(ns)
    assert torch.allclose(new["head.weight"], g["head.weight"] + head, atol=1e-12)


def test_hetlora_client_norm_weights_are_the_norm_of_the_whole_client_update() -> None:
    g = lora_state({"m1": (6, 5, 8), "m2": (3, 7, 8)})
    ranks = [2, 8, 4]
    updates = [client_factors(g, r, 20 + r) for r in ranks]
    new = run_round(make("hetlora", weighting="client_norm"), g, [ClientUpdate(i, u, 1) for i, u in enumerate(updates)])
    # sparsity weight of client k: ||S_k|| with S_k = B_k A_k, here the whole adapter's (all modules stacked)
    s = [
        sum(torch.linalg.norm(u[f"{m}.lora_B.weight"] @ u[f"{m}.lora_A.weight"]) ** 2 for m in ("m1", "m2")) ** 0.5
        for u in updates
    ]
    z = sum(s)  # Z = sum_k ||S_k||
    for m in ("m1", "m2"):
        a_name, b_name = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        want_a, want_b = torch.zeros_like(g[a_name]), torch.zeros_like(g[b_name])
        for u, r, w in zip(updates, ranks, s, strict=True):  # zero-pad to r_max, then sum_k (||S_k|| / Z) pad(.)
            want_a[:r] += w / z * u[a_name]
            want_b[:, :r] += w / z * u[b_name]
        assert torch.allclose(new[a_name], want_a, atol=1e-10) and torch.allclose(new[b_name], want_b, atol=1e-10)


def test_hetlora_decrease_rule_prunes_when_the_tail_term_fell_during_training() -> None:
    gamma, lam = 0.75, 0.1
    spec = RankPrune(lam=lam, keep=gamma, threshold=0.0, min_rank=1, rule="decrease")
    hp = TaskHyperparams(rank_prune=spec.to_wire()).to_dict()
    assert RankPrune.from_hyperparams(hp) == spec
    assert RankPrune.from_hyperparams({"rank_prune": [lam, gamma, 0.2, 1]}).rule == "share"  # four numbers: the share rule
    received = client_factors(lora_state({"m1": (6, 5, 8), "m2": (3, 7, 8)}), 8, 5)
    r = 8
    t = int(gamma * r)  # the tail: ranks t..r (the last (1 - gamma) r), pruned to floor(gamma r)

    def tail(s: AdapterState) -> float:  # the regulariser's norm: sum over modules of ||B[:, t:] A[t:]||_F
        return sum(float(torch.linalg.norm(s[f"{m}.lora_B.weight"][:, t:] @ s[f"{m}.lora_A.weight"][t:])) for m in ("m1", "m2"))

    grown = received.clone()
    for m in ("m1", "m2"):
        grown.tensors[f"{m}.lora_B.weight"][:, t:] *= 1.5
    kept, metrics = prune_update(hp, grown, received)
    assert (
        tail(grown) > tail(received)
        and metrics["hetlora_rank"] == r
        and torch.equal(kept["m1.lora_A.weight"], grown["m1.lora_A.weight"])
    )
    shrunk = received.clone()
    for m in ("m1", "m2"):
        shrunk.tensors[f"{m}.lora_B.weight"][:, t:] *= 0.9
    pruned, metrics = prune_update(hp, shrunk, received)
    assert tail(shrunk) < tail(received) and metrics["hetlora_rank"] == t
    assert not pruned["m2.lora_A.weight"][t:].any() and not pruned["m1.lora_B.weight"][:, t:].any()
    assert torch.equal(pruned["m2.lora_B.weight"][:, :t], shrunk["m2.lora_B.weight"][:, :t])
    assert prune_update(hp, shrunk)[1]["hetlora_rank"] == r  # nothing to compare with: no pruning
    strategy = make("hetlora", prune_rule="decrease", prune_threshold=0.0, prune_lambda=0.0)
    assert RankPrune.from_hyperparams(strategy.configure_train(1, received)).rule == "decrease"  # sent even with lam = 0
