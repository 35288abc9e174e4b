"""The worker runtime trains a round's clients in lockstep with the same updates as one by one.

Two runtimes on the real MiniLM + LoRA model, identical but for ``train.lockstep``, get the same
tasks; every encoded update must match. SGD keeps the comparison at fp32 rounding (~1e-8; see
tests/launch/test_lockstep.py for why AdamW is not compared at 1e-5). Each strategy's task
hyperparameters change what is trained: fedprox's proximal term, ffa_lora's frozen A,
fedsa_lora's personal B (restored from disk in round 2), flexlora's per-client ranks (two ranks
in one batch: two lockstep groups), a byzantine client, and a lossy codec with error feedback.
"""

from __future__ import annotations

import pytest
import torch

from dpeft.codec import decode_state, encode_state
from dpeft.codec.updates import CodecSpec
from dpeft.codec.updates.session import RunCodecs
from dpeft.errors import ConfigError
from dpeft.strategies import make_strategy
from dpeft.strategies.flexlora import redistribute
from dpeft.strategies.hetlora import truncate
from dpeft.strategies.hyperparams import update_schema
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.runtime import WorkerRuntime
from dpeft_workers.simulate import Heterogeneity

pytestmark = pytest.mark.integration

BASE = [
    "clients=5",
    "data.max_train_examples=200",
    "model.max_length=32",
    "data.partition=iid",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.optimizer=sgd",
    "train.momentum=0.9",
    "train.lr=0.5",
    "data.test_examples=64",
    "model.dropout=0",
    "simulate.byzantine_clients=[4]",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    out = {}
    for lockstep in (True, False):
        run_dir = tmp_path_factory.mktemp(f"lockstep-{lockstep}")
        cfg = load_config(None, [*BASE, f"run_dir={run_dir}", f"train.lockstep={str(lockstep).lower()}"])
        out[lockstep] = Heterogeneity(cfg).install(WorkerRuntime(cfg))  # as `dpeft simulate` runs it (byzantine client)
    return out


@pytest.fixture(scope="module")
def global_state(runtimes):
    from dpeft.adapters import extract_state

    rt = runtimes[False]
    rt.model.set_adapter("default")
    return extract_state(rt.model)


def _both(runtimes, tasks, payloads, decode=decode_state):
    """Run the tasks on both runtimes: [(lockstep update, sequential update, lockstep metrics)]."""
    items = list(zip(tasks, payloads, strict=True))
    together = runtimes[True].train_tasks(items)
    alone = runtimes[False].train_tasks(items)
    assert len(together) == len(alone) == len(tasks)
    return [(decode(t[0]), decode(a[0]), t[2]) for t, a in zip(together, alone, strict=True)]


def _tasks(clients, hp, round_num=1):
    return [TrainTask(f"r{round_num}-c{c}", round_num, c, "b", 0, b"", dict(hp)) for c in clients]


def _same(got, want, tol=1e-5):
    assert list(got.tensors) == list(want.tensors)
    assert got.tensors, "an empty update"
    for k in want.tensors:
        diff = float((got[k] - want[k]).abs().max())
        assert diff <= tol, (k, diff)
    assert max(float(v.abs().max()) for v in want.tensors.values()) > 1e-3, "nothing trained"


def test_plain_round_with_a_byzantine_client(runtimes, global_state) -> None:
    payload = encode_state(global_state)
    out = _both(runtimes, _tasks(range(5), {}), [payload] * 5)
    for got, want, metrics in out:
        _same(got, want)
        assert metrics["lockstep_clients"] == 5
    honest = max(float(v.abs().max()) for v in out[0][1].tensors.values())
    assert max(float(v.abs().max()) for v in out[4][1].tensors.values()) > 50 * honest  # client 4 is byzantine (x -100)


@pytest.mark.parametrize("strategy", ["fedprox", "ffa_lora"])
def test_strategies_that_change_training(runtimes, global_state, strategy) -> None:
    cfg = load_config(None, [f"strategy.name={strategy}", *(["strategy.options.mu=0.5"] if strategy == "fedprox" else [])])
    hp = make_strategy(cfg.strategy).configure_train(1, global_state)
    assert hp, "the strategy should hand clients hyperparameters"
    out = _both(runtimes, _tasks([0, 1], hp), [encode_state(global_state)] * 2)
    for got, want, metrics in out:
        _same(got, want)
        assert metrics["lockstep_clients"] == 2
        if strategy == "ffa_lora":
            assert not any(".lora_A." in k for k in got.tensors)


def test_fedsa_personal_b_restored_in_round_two(runtimes, global_state) -> None:
    hp = make_strategy(load_config(None, ["strategy.name=fedsa_lora"]).strategy).configure_train(1, global_state)
    for round_num in (1, 2):
        out = _both(runtimes, _tasks([1, 3], hp, round_num), [encode_state(global_state)] * 2)
        for got, want, _ in out:
            _same(got, want)
            assert not any(".lora_B." in k for k in got.tensors)
    for c in (1, 3):
        mine, theirs = runtimes[True].personal.load(c), runtimes[False].personal.load(c)
        assert mine is not None and theirs is not None
        _same(mine, theirs)


def test_flexlora_mixed_ranks_train_in_one_group_per_rank(runtimes, global_state) -> None:
    hp = make_strategy(load_config(None, ["strategy.name=flexlora"]).strategy).configure_train(1, global_state)
    ranks = {0: 4, 1: 8, 2: 4, 3: 8}
    payloads = [encode_state(redistribute(global_state, r) if r != 8 else global_state) for r in ranks.values()]
    out = _both(runtimes, _tasks(ranks, hp), payloads)
    for (got, want, metrics), rank in zip(out, ranks.values(), strict=True):
        _same(got, want)
        assert metrics["lora_rank"] == rank and metrics["lockstep_clients"] == 2


def test_hetlora_tail_penalty_and_pruning_match_in_lockstep(runtimes, global_state) -> None:
    strategy = make_strategy(load_config(None, ["strategy.name=hetlora", "strategy.options={prune_lambda: 0.0001, prune_threshold: 0.9}"]).strategy)
    hp = strategy.configure_train(1, global_state)
    ranks = {0: 4, 1: 4}
    payloads = [encode_state(truncate(global_state, 4)) for _ in ranks]
    out = _both(runtimes, _tasks(ranks, hp), payloads)
    for got, want, metrics in out:
        _same(got, want)  # the penalty joins each client's loss in lockstep as when trained alone
        assert metrics["hetlora_rank"] == 3 and metrics["lockstep_clients"] == 2, metrics["hetlora_tail_share"]
        a = next(v for k, v in got.items() if ".lora_A." in k)
        assert a.shape[0] == 4 and not a[3:].any()  # the pruned tail is sent as zeros


def test_lossy_codec_with_error_feedback(runtimes, global_state, tmp_path) -> None:
    spec = CodecSpec.from_config({"up": "int8", "down": "fp32", "options": {}})
    saved = {k: rt.codecs for k, rt in runtimes.items()}
    try:
        for k, rt in runtimes.items():
            rt.codecs = RunCodecs.from_spec(spec, error_feedback=True, residual_dir=tmp_path / f"res-{k}")
        schema = update_schema(global_state.schema(), {})

        def decode(blob):
            dec = runtimes[False].codecs.update_decoder(schema)
            dec.feed(blob)
            return dec.finish()

        for round_num in (1, 2):  # round 2 adds each client's round-1 residual
            out = _both(runtimes, _tasks([0, 2], {}, round_num), [encode_state(global_state)] * 2, decode)
            for got, want, _ in out:
                # the same delta up to fp32 rounding, then quantized: a value on a rounding boundary lands
                # one int8 step away (two in round 2, through the residual); step = block absmax / 127
                step = max(float(v.abs().max()) for v in want.tensors.values()) / 127
                _same(got, want, tol=2.01 * step)
        assert sorted(p.name for p in (tmp_path / "res-True").iterdir()) == sorted(
            p.name for p in (tmp_path / "res-False").iterdir()
        )
    finally:
        for k, rt in runtimes.items():
            rt.codecs = saved[k]


def test_lockstep_config_needs_dropout_off() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lockstep=true"])
    assert err.value.key == "model.dropout"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lockstep=true", "model.dropout=0", "adapter.dropout=0.1"])
    assert err.value.key == "adapter.dropout"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lockstep=true", "model.dropout=0", "adapter.method=ia3"])
    assert err.value.key == "train.lockstep"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lockstep_clients=0"])
    assert err.value.key == "train.lockstep_clients"
    assert load_config(None, ["train.lockstep=true", "model.dropout=0"]).train.lockstep
