"""TaskHyperparams: the typed strategy-to-worker contract and its unchanged dict wire form."""

from __future__ import annotations

from collections import OrderedDict

import torch
from strategy_testlib import make

from dpeft.state import AdapterState
from dpeft.strategies.hyperparams import TaskHyperparams, is_full_factor, omitted_components, sent_names


def _lora_state() -> AdapterState:
    return AdapterState(OrderedDict([
        ("m.lora_A.weight", torch.zeros(2, 4)),
        ("m.lora_B.weight", torch.zeros(4, 2)),
        ("head.weight", torch.zeros(2, 4)),
    ]))  # fmt: skip


def test_wire_form_holds_only_the_set_fields() -> None:
    assert TaskHyperparams().to_dict() == {}
    assert TaskHyperparams(prox_mu=0.0).to_dict() == {"prox_mu": 0.0}
    assert TaskHyperparams(freeze=("lora_A",), attempt=1).to_dict() == {"freeze": ["lora_A"], "attempt": 1}


def test_round_trip_ignores_unknown_keys() -> None:
    hp = TaskHyperparams(personal=("lora_B",), full_factors=("lora_A", "lora_B"), task_seq=7, attempt=2, prox_mu=0.5)
    assert TaskHyperparams.from_dict(hp.to_dict()) == hp
    assert TaskHyperparams.from_dict({"freeze": ["lora_A"], "future_key": 3}) == TaskHyperparams(freeze=("lora_A",))


def test_strategies_send_the_same_dicts_as_before() -> None:
    state = _lora_state()
    assert make("fedprox", mu=0.25).configure_train(1, state) == {"prox_mu": 0.25}
    assert make("ffa_lora").configure_train(1, state) == {"freeze": ["lora_A"]}
    assert make("fedsa_lora").configure_train(1, state) == {"personal": ["lora_B"]}
    assert make("flexlora").configure_train(1, state) == {"full_factors": ["lora_A", "lora_B"]}
    assert make("fedavg").configure_train(1, state) == {}


def test_helpers_read_the_wire_form() -> None:
    names = ["m.lora_A.weight", "m.lora_B.weight", "head.weight"]
    hp = {"freeze": ["lora_A"], "personal": ["lora_B"]}
    assert omitted_components(hp) == ["lora_A", "lora_B"]
    assert sent_names(names, hp) == ["head.weight"]
    assert is_full_factor("m.lora_A.weight", {"full_factors": ["lora_A"]}) and not is_full_factor("head.weight", {"full_factors": ["lora_A"]})
    assert sent_names(names, {}) == names
