"""LoRA-aware strategies: pairing, FFA-LoRA, FedSA-LoRA, FLoRA, FlexLoRA."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_testlib import close, lora_state, make, random_like, run_round, upd

from dpeft.errors import ConfigError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.base import unwrap
from dpeft.strategies.flexlora import redistribute
from dpeft.strategies.lora import INIT_ROW_NORM, factorize, lora_pairs, product

Q = "bert.encoder.layer.0.attention.self.query"
V = "bert.encoder.layer.0.attention.self.value"
MODULES = {Q: (5, 4, 2), V: (3, 4, 2)}
PLAIN = {"classifier.weight": (2, 4), "classifier.bias": (2,)}


def products(s: AdapterState) -> dict[str, torch.Tensor]:
    return {m: product(s[a], s[b]) for m, (a, b) in lora_pairs(s.tensors).items()}


def weighted_mean(mats: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * p for w, p in zip(weights, mats, strict=True)) / sum(weights)


def add(a: AdapterState, b: AdapterState) -> AdapterState:
    return AdapterState(OrderedDict((k, a[k] + b[k]) for k in a.tensors))


# ---------------------------------------------------------------- pairing and SVD


def test_lora_pairs() -> None:
    names = [
        f"{Q}.lora_A.weight", f"{Q}.lora_B.weight", f"{Q}.lora_B.bias", "classifier.weight",
        "emb.lora_embedding_A", "emb.lora_embedding_B", "x.mylora_A.weight", "y.lora_A_extra.weight",
    ]  # fmt: skip
    assert lora_pairs(names) == {
        Q: (f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
        "emb": ("emb.lora_embedding_A", "emb.lora_embedding_B"),
    }
    with pytest.raises(ValueError, match="without its B"):
        lora_pairs(["m.lora_A.weight"])


def test_factorize_exact_at_full_rank_and_error_formula() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b, a, disc, total = factorize(p, 4)
    assert close(b @ a, p, 1e-12) and disc < 1e-20
    s = torch.linalg.svdvals(p)
    b, a, disc, total = factorize(p, 2)
    assert abs(disc - float((s[2:] ** 2).sum())) < 1e-10 and abs(total - float((s**2).sum())) < 1e-10
    assert abs(float(torch.linalg.norm(p - b @ a)) ** 2 - disc) < 1e-10
    # balanced split: B = U sqrt(S), A = sqrt(S) V^T -> column norms of B equal row norms of A
    assert close(b.norm(dim=0), a.norm(dim=1), 1e-10)


def test_factorize_zero_product_stays_trainable() -> None:
    b, a, _, _ = factorize(torch.zeros(3, 4, dtype=torch.float64), 2)
    assert torch.count_nonzero(b) == 0
    assert close(a.norm(dim=1), torch.full((2,), INIT_ROW_NORM, dtype=torch.float64), 1e-12)
    b, a, _, _ = factorize(torch.ones(3, 2, dtype=torch.float64), 4)  # rank beyond min(out, in): zero slots
    assert b.shape == (3, 4) and a.shape == (4, 2) and close(b @ a, torch.ones(3, 2), 1e-12)


# ---------------------------------------------------------------- FFA-LoRA


def test_ffa_lora_exact_mean_of_products() -> None:
    g = lora_state(MODULES, PLAIN, seed=1)
    s = make("ffa_lora")
    assert s.configure_train(0, g) == {"freeze": ["lora_A"]}
    weights = [1, 3, 2]
    deltas = [random_like(g, 10 + i, 0.5) for i in range(3)]  # A deltas are nonzero: must be ignored
    new = run_round(s, g, [upd(i, d, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))])
    for a_name, b_name in lora_pairs(g.tensors).values():
        assert torch.equal(new[a_name], g[a_name])
        client_products = [product(g[a_name], g[b_name] + d[b_name]) for d in deltas]
        assert close(product(new[a_name], new[b_name]), weighted_mean(client_products, weights), 1e-10)
    for k in PLAIN:
        assert close(new[k], g[k] + weighted_mean([d[k] for d in deltas], weights), 1e-10)


def test_ffa_lora_accepts_updates_without_a() -> None:
    g = lora_state(MODULES, PLAIN, seed=2)
    d = random_like(g, 3)
    no_a = AdapterState(OrderedDict((k, v) for k, v in d.items() if ".lora_A." not in k))
    a, b = run_round(make("ffa_lora"), g, [upd(0, d)]), run_round(make("ffa_lora"), g, [upd(0, no_a)])
    assert all(torch.equal(a[k], b[k]) for k in g.tensors)


def test_lora_strategies_need_lora() -> None:
    g = AdapterState({"prompt_encoder.embedding.weight": torch.zeros(4, 3)})
    for name in ("ffa_lora", "fedsa_lora", "flora", "flexlora"):
        with pytest.raises(ConfigError):
            make(name).begin_round(g)


# ---------------------------------------------------------------- FedSA-LoRA


def test_fedsa_lora_shares_a_keeps_b() -> None:
    g = lora_state(MODULES, PLAIN, seed=4)
    s = make("fedsa_lora", server_lr=0.5)
    assert s.configure_train(0, g) == {"personal": ["lora_B"]}
    deltas = [random_like(g, 20 + i) for i in range(2)]
    new = run_round(s, g, [upd(0, deltas[0], 1), upd(1, deltas[1], 3)])
    for k in g.tensors:
        if ".lora_B." in k:
            assert torch.equal(new[k], g[k])
        else:
            assert close(new[k], g[k] + 0.5 * weighted_mean([d[k] for d in deltas], [1, 3]), 1e-10)


# ---------------------------------------------------------------- FLoRA


def _flora_round(seed: int, modules: dict, weights: list[int], **opts):
    g = lora_state(modules, PLAIN, seed=seed)
    deltas = [random_like(g, 100 * seed + i, 0.3) for i in range(len(weights))]
    s = make("flora", **opts)
    agg = s.begin_round(g)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        agg.add(upd(i, d, w))
    means = unwrap(agg).mean_products()
    return g, deltas, s, agg, means


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(1, 50), min_size=1, max_size=4))
def test_flora_product_sum_is_weighted_mean_and_stacking(seed: int, weights: list[int]) -> None:
    g, deltas, _, _, means = _flora_round(seed, MODULES, weights)
    total = sum(weights)
    for m, (a_name, b_name) in lora_pairs(g.tensors).items():
        a_i = [g[a_name] + d[a_name] for d in deltas]
        b_i = [g[b_name] + d[b_name] for d in deltas]
        expected = weighted_mean([b @ a for a, b in zip(a_i, b_i, strict=True)], weights)
        assert close(means[m], expected, 1e-5)
        b_stack = torch.cat([(w / total) * b for w, b in zip(weights, b_i, strict=True)], dim=1)
        a_stack = torch.cat(a_i, dim=0)
        assert close(b_stack @ a_stack, means[m], 1e-5)


def test_flora_full_rank_truncation_is_exact() -> None:
    modules = {Q: (5, 4, 4), V: (3, 4, 3)}  # rank >= min(out, in): nothing to truncate
    g, deltas, s, agg, means = _flora_round(7, modules, [2, 1, 5])
    new = s.finish_round(g, agg)
    assert new.schema() == g.schema()
    for m, p in products(new).items():
        assert close(p, means[m], 1e-5)
    assert s.last_metrics["flora_truncation_error"] < 1e-6
    for k in PLAIN:
        assert close(new[k], g[k] + weighted_mean([d[k] for d in deltas], [2, 1, 5]), 1e-10)


def test_flora_truncation_keeps_shapes_and_reports_error() -> None:
    g, _, s, agg, means = _flora_round(8, MODULES, [1, 1, 1])
    new = s.finish_round(g, agg)
    assert new.schema() == g.schema()
    disc = tot = 0.0
    for m, p in means.items():
        sv = torch.linalg.svdvals(p)
        disc, tot = disc + float((sv[2:] ** 2).sum()), tot + float((sv**2).sum())
        best = torch.linalg.svd(p)
        approx = best.U[:, :2] @ torch.diag(best.S[:2]) @ best.Vh[:2]
        assert close(products(new)[m], approx, 1e-8)
    assert abs(s.last_metrics["flora_truncation_error"] - (disc / tot) ** 0.5) < 1e-9
    assert s.last_metrics["flora_truncation_error"] > 0


def test_flora_rank_option_and_server_lr() -> None:
    g, _, s, agg, means = _flora_round(9, MODULES, [1, 2], rank=1)
    new = s.finish_round(g, agg)
    assert new.schema() == g.schema()
    for m in means:
        assert int(torch.linalg.matrix_rank(products(new)[m])) == 1
    with pytest.raises(ConfigError):
        make("flora", rank=3).begin_round(g)
    half = make("flora", server_lr=0.5)
    full_rank = lora_state({Q: (3, 3, 3)}, seed=1)
    d = random_like(full_rank, 2)
    new = run_round(half, full_rank, [upd(0, d)])
    target = product(full_rank[f"{Q}.lora_A.weight"], full_rank[f"{Q}.lora_B.weight"])
    client = product(add(full_rank, d)[f"{Q}.lora_A.weight"], add(full_rank, d)[f"{Q}.lora_B.weight"])
    assert close(products(new)[Q], target + 0.5 * (client - target), 1e-8)


def test_flora_rejects_mismatched_update() -> None:
    g = lora_state(MODULES, seed=1)
    agg = make("flora").begin_round(g)
    bad = lora_state({Q: (5, 4, 3), V: (3, 4, 2)}, seed=2)
    with pytest.raises(RejectedUpdate):
        agg.add(upd(0, bad))
    assert agg.count == 0


# ---------------------------------------------------------------- FlexLoRA


def test_flexlora_heterogeneous_ranks() -> None:
    out_dim, in_dim = 12, 10
    g = lora_state({Q: (out_dim, in_dim, 8)}, PLAIN, seed=3)
    s = make("flexlora", rank=8, client_ranks=[2, 4, 8])
    assert s.configure_train(0, g) == {"full_factors": ["lora_A", "lora_B"]}
    weights = [3, 1, 2]
    ups, prods = [], []
    for cid, (rank, w) in enumerate(zip([2, 4, 8], weights, strict=True)):
        start = s.client_state(g, cid)
        assert start[f"{Q}.lora_A.weight"].shape == (rank, in_dim)
        assert start[f"{Q}.lora_B.weight"].shape == (out_dim, rank)
        local = add(start, random_like(start, 50 + cid, 0.2))  # "training"
        delta = OrderedDict((k, local[k] if ".lora_" in k else local[k] - start[k]) for k in local.tensors)
        ups.append(upd(cid, AdapterState(delta), w))
        prods.append(product(local[f"{Q}.lora_A.weight"], local[f"{Q}.lora_B.weight"]))
    new = run_round(s, g, ups)
    assert new[f"{Q}.lora_A.weight"].shape == (8, in_dim) and new[f"{Q}.lora_B.weight"].shape == (out_dim, 8)
    mean = weighted_mean(prods, weights)
    svd = torch.linalg.svd(mean)
    best8 = svd.U[:, :8] @ torch.diag(svd.S[:8]) @ svd.Vh[:8]
    assert close(products(new)[Q], best8, 1e-8)
    assert abs(s.last_metrics["flexlora_truncation_error"] - float(svd.S[8:].norm() / svd.S.norm())) < 1e-9
    # configured rank smaller than the global's: the global changes shape to that rank
    s4 = make("flexlora", rank=4)
    new4 = run_round(s4, g, ups)
    assert new4[f"{Q}.lora_A.weight"].shape == (4, in_dim) and new4[f"{Q}.lora_B.weight"].shape == (out_dim, 4)
    assert close(products(new4)[Q], svd.U[:, :4] @ torch.diag(svd.S[:4]) @ svd.Vh[:4], 1e-8)


def test_flexlora_exact_when_rank_covers_product() -> None:
    g = lora_state({Q: (6, 5, 8)}, seed=5)
    ups = [upd(i, lora_state({Q: (6, 5, r)}, seed=60 + i), w) for i, (r, w) in enumerate([(2, 1), (4, 2), (8, 3)])]
    new = run_round(make("flexlora"), g, ups)
    expected = weighted_mean([product(u.delta[f"{Q}.lora_A.weight"], u.delta[f"{Q}.lora_B.weight"]) for u in ups], [1, 2, 3])
    assert close(products(new)[Q], expected, 1e-10)


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_redistribute_shapes_and_product(rank: int) -> None:
    g = lora_state({Q: (7, 6, 4), V: (3, 6, 4)}, PLAIN, seed=11)
    r = redistribute(g, rank)
    for m, (a_name, b_name) in lora_pairs(g.tensors).items():
        out_dim = g[b_name].shape[0]
        assert r[a_name].shape == (rank, 6) and r[b_name].shape == (out_dim, rank)
        p, q = products(g)[m], products(r)[m]
        if rank >= 4:
            assert close(q, p, 1e-10)
            # extra slots beyond the product's rank must still be trainable (A rows nonzero, up to in)
            rows = r[a_name].norm(dim=1)
            assert bool((rows[:6] > 0).all()) and bool((rows[6:] == 0).all())
            a2 = r[a_name][:6]
            gram = a2 @ a2.T
            assert close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(min(rank, 6), min(rank, 6)), 1e-10)
        else:
            sv = torch.linalg.svdvals(p)
            assert abs(float((p - q).norm()) - float(sv[rank:].norm())) < 1e-9
    for k in PLAIN:
        assert torch.equal(r[k], g[k])


def test_flexlora_client_state_default_is_global_and_bad_shapes_rejected() -> None:
    g = lora_state({Q: (6, 5, 4)}, seed=1)
    s = make("flexlora")
    assert s.client_state(g, 3) is g
    agg = s.begin_round(g)
    with pytest.raises(RejectedUpdate):
        agg.add(upd(0, lora_state({Q: (6, 4, 2)}, seed=2)))  # wrong input dim
    with pytest.raises(RejectedUpdate):
        agg.add(upd(0, AdapterState({f"{Q}.lora_A.weight": torch.zeros(2, 5), f"{Q}.lora_B.weight": torch.zeros(6, 3)})))
