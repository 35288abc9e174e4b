"""Kill-and-Revive: the rule on synthetic factors, and its effect on a real split run."""

from __future__ import annotations

import copy

import pytest
import torch
from split_testlib import loopback

from dpeft.adapters import adapter_parameters, build_model
from dpeft.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.errors import ConfigError
from dpeft.split.config import KillReviveConfig, SplitConfig, load_split_config
from dpeft.split.kr import KillRevive, active_budget, select_active


def _kr(n=4, **kw):
    cfg = KillReviveConfig(enabled=True, **kw)
    factors = [[torch.zeros(2, 3), torch.zeros(3, 2)] for _ in range(n)]
    return KillRevive(cfg, n, lambda i: factors[i]), factors


def _move(factors, amounts):
    for i, a in enumerate(amounts):
        factors[i][0] += a  # 6 elements: change of L2 norm a * sqrt(6)


def test_budget_and_selection():
    assert active_budget(0.5, 12) == 6
    assert active_budget(0.01, 12) == 1
    assert active_budget(1.0, 5) == 5
    assert select_active({0: 1.0, 1: 3.0, 2: 3.0, 3: 0.5}, 2) == {1, 2}
    assert select_active({0: 2.0, 1: 2.0, 2: 2.0}, 1) == {0}  # ties: lower index


def test_kill_least_changing_after_warmup_then_revive_and_rescore():
    kr, f = _kr(4, budget=0.5, window=2, warmup=3, revive_every=6)
    assert kr.warmup == 4  # rounded up to a window boundary
    _move(f, [1, 0.1, 2, 0.2])
    assert not kr.after_step(1).killed
    d = kr.after_step(2)  # boundary, but still in warmup: scored, nothing killed
    assert not d.killed and d.scores[2] > d.scores[0] > d.scores[3] > d.scores[1]
    assert kr.active == {0, 1, 2, 3}
    _move(f, [1, 0.1, 2, 0.2])
    kr.after_step(3)
    d = kr.after_step(4)
    assert d.killed == [1, 3] and kr.active == {0, 2}
    # a killed module is not scored; the active ones keep their window
    _move(f, [0.0, 5.0, 1.0, 5.0])
    d = kr.after_step(5) or None
    d = kr.after_step(6)  # revive boundary: everyone active again, no kill at this boundary
    assert d.revived == [1, 3] and not d.killed and set(d.scores) == {0, 2}
    assert kr.active == {0, 1, 2, 3}
    _move(f, [0.0, 5.0, 1.0, 5.0])  # now 1 and 3 move most: they stay, 0 and 2 are killed
    kr.after_step(7)
    d = kr.after_step(8)
    assert d.killed == [0, 2] and kr.active == {1, 3}


def _window(kr, f, t, amounts):
    """Move the factors by ``amounts`` during the window ending at step ``t``, then step to ``t``."""
    _move(f, amounts)
    for s in range(t - kr.cfg.window + 1, t + 1):
        d = kr.after_step(s)
    return d


def test_partial_revive_by_score_then_the_revived_module_competes():
    kr, f = _kr(4, budget=0.25, window=1, warmup=1, revive_every=3, revive_count=1)
    d = _window(kr, f, 1, [3, 2, 1, 0.5])  # warmup boundary: the kill keeps module 0 only
    assert d.killed == [1, 2, 3] and kr.active == {0}
    _window(kr, f, 2, [3, 0, 0, 0])
    d = _window(kr, f, 3, [3, 0, 0, 0])  # revive point: one module back, the best-scored killed one
    assert d.revived == [1] and kr.active == {0, 1}
    d = _window(kr, f, 4, [1.5, 5, 0, 0])  # module 1 now moves more: it replaces 0
    assert d.killed == [0] and kr.active == {1}
    assert kr.scores[0] == pytest.approx(1.5 * 6**0.5) and kr.scores[1] == pytest.approx(5 * 6**0.5)
    _window(kr, f, 5, [0, 1, 0, 0])
    d = _window(kr, f, 6, [0, 1, 0, 0])  # next revive: module 0 (1.5 sqrt 6) beats 2 (stale sqrt 6)
    assert d.revived == [0]


def test_revive_oldest_first_round_robin():
    kr, f = _kr(4, budget=0.25, window=1, warmup=1, revive_every=2, revive_count=1, revive_order="oldest")
    _window(kr, f, 1, [1, 2, 3, 4])
    assert kr.active == {3} and kr.killed_at == {0: 1, 1: 1, 2: 1}
    d = _window(kr, f, 2, [0, 0, 0, 1])
    assert d.revived == [0]  # all killed at step 1: lowest index
    d = _window(kr, f, 3, [0.1, 0, 0, 1])  # 0 loses again, killed at step 3
    assert d.killed == [0] and kr.killed_at[0] == 3
    d = _window(kr, f, 4, [0, 0, 0, 1])
    assert d.revived == [1]  # killed at step 1, before 0's second kill


def test_ema_smooths_scores_and_relative_divides_by_the_norm():
    kr, f = _kr(2, budget=0.5, window=1, warmup=10, revive_every=0, ema=0.5)
    _window(kr, f, 1, [2, 0])
    _window(kr, f, 2, [0, 0])
    assert kr.scores[0] == pytest.approx(0.5 * 2 * 6**0.5) and kr.last_scores[0] == 0.0
    f = [[torch.ones(2, 3), torch.zeros(3, 2)], [torch.full((2, 3), 10.0), torch.zeros(3, 2)]]
    kr = KillRevive(
        KillReviveConfig(enabled=True, budget=0.5, window=1, warmup=0, revive_every=0, score="relative"), 2, lambda i: f[i]
    )
    d = _window(kr, f, 1, [1, 1])  # the same absolute change; module 1 started 10x larger
    assert d.scores[0] == pytest.approx(1.0) and d.scores[1] == pytest.approx(0.1)
    assert d.killed == [1]


def test_loss_drop_scores_the_loss_decrease_of_each_modules_updates():
    kr, f = _kr(3, budget=1 / 3, window=2, warmup=0, revive_every=0, score="loss_drop")
    for t in (1, 2):
        for i, g in enumerate([1.0, -2.0, 0.5]):
            f[i][0].grad = torch.full_like(f[i][0], g)
        kr.before_update()
        for i, g in enumerate([1.0, -2.0, 0.5]):
            f[i][0] -= 0.1 * g  # a gradient step: loss drop 0.1 * g^2 per element
        d = kr.after_step(t)
    assert d.scores == pytest.approx({0: 2 * 6 * 0.1, 1: 2 * 6 * 0.4, 2: 2 * 6 * 0.025})
    assert d.killed == [0, 2] and kr.active == {1}


def test_disabled_never_kills():
    cfg = KillReviveConfig(enabled=False, budget=0.25, window=1, warmup=0)
    kr = KillRevive(cfg, 4, lambda i: [torch.zeros(1)])
    for t in range(1, 20):
        assert not kr.after_step(t).killed
    assert kr.active == {0, 1, 2, 3}


def test_kr_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="split.kr.budget"):
        load_split_config(None, ["split.kr.budget=0"])
    with pytest.raises(ConfigError, match="split.kr.revive_every"):
        load_split_config(None, ["split.kr.window=4", "split.kr.revive_every=6"])
    with pytest.raises(ConfigError, match="split.kr.score"):
        load_split_config(None, ["split.kr.score=random"])
    with pytest.raises(ConfigError, match="split.kr.ema"):
        load_split_config(None, ["split.kr.ema=1"])
    with pytest.raises(ConfigError, match="split.kr.revive_count"):
        load_split_config(None, ["split.kr.revive_count=-1"])
    with pytest.raises(ConfigError, match="split.kr.revive_order"):
        load_split_config(None, ["split.kr.revive_order=random"])
    with pytest.raises(ConfigError, match="split.kr.nope"):
        load_split_config(None, ["split.kr.nope=1"])
    with pytest.raises(ConfigError, match="model.task"):
        load_split_config(None, ["model.task=token_cls"])
    with pytest.raises(ConfigError, match="adapter.method"):
        load_split_config(None, ["adapter.method=ia3"])
    assert load_split_config(None, ["model.task=causal_lm"])[0].model.task == "causal_lm"  # on Llama models
    run, split = load_split_config(None, ["rounds=3", "split.kr.enabled=true", "split.edges=3"])
    assert run.rounds == 3 and split.kr.enabled and split.edges == 3


def test_killed_modules_cost_nothing_on_the_edge_and_keep_the_function():
    """After a kill: fewer calls and bytes per step, and eval logits still equal the monolithic model's."""
    bundle = build_model(ModelConfig(max_length=24), RunConfig().adapter, 2, 0)
    model = bundle.model
    train, _ = load_dataset(DataConfig(max_train_examples=16, test_examples=4), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, 24)
    batch = data.batch(list(range(4)))
    run = RunConfig(train=TrainConfig(loss="cross_entropy", lr=1e-2))
    split = SplitConfig(federated=False, kr=KillReviveConfig(enabled=True, budget=0.25, window=2, warmup=2, revive_every=0))
    with loopback(model, run, split) as (edge, channel, welcome, service):
        welcome.tensors({})
        sent = []

        def on_frozen(killed, revived):
            sent.append((killed, revived))
            edge.sync_frozen(channel, killed, revived)

        def train_step():
            return edge.step(channel, batch["input_ids"], batch["attention_mask"], batch["labels"], True, on_frozen=on_frozen)[0]

        stats = [train_step(), train_step()]
        killed = edge.killed()
        frozen_values = {i: [t.detach().clone() for t in edge._factors(i)] for i in killed}
        stats += [train_step(), train_step()]
        assert edge.killed() == killed
        assert len(killed) == 12 - 3 and sent and sent[0][0] == killed
        assert len(edge.kr.active) == 3
        assert service.sessions[0].frozen.keys() == set(killed)
        # steps 1-2 all 12 modules active (6 calls); steps 3-4 only 3 modules
        assert stats[0].lora_calls == 6 and stats[3].lora_calls <= 3
        assert stats[3].bytes_up < 0.5 * stats[0].bytes_up and stats[3].flops < 0.4 * stats[0].flops
        _, logits = edge.step(channel, batch["input_ids"], batch["attention_mask"], None, train=False)
        ref = copy.deepcopy(model)
        from dpeft.adapters import load_state

        load_state(ref, edge.state())
        ref.eval()
        with torch.no_grad():
            expect = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert float((logits - expect).abs().max()) < 1e-5
        # killed factors stayed frozen through the steps after the kill
        for i, values in frozen_values.items():
            assert all(torch.equal(v, t.detach()) for v, t in zip(values, edge._factors(i), strict=True))
        keys = adapter_parameters(model)
        assert len(edge.state().tensors) == len(keys)  # killed factors stay in the adapter state
