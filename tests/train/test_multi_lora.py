"""Multi-LoRA lockstep training equals training the clients one after another."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from dpeft.adapters import adapter_parameters, extract_state, load_state
from dpeft.config import TrainConfig
from dpeft.data import tokenize
from dpeft.state import AdapterState
from dpeft.train.loop import local_train, task_seed
from dpeft.train.multi_lora import ClientJob, disable_dropout, lockstep_train, lockstep_unsupported, restore_dropout


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine, 2 threads per process mostly wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_dropout_model(minilm_model):
    old = disable_dropout(minilm_model.model)
    yield minilm_model
    restore_dropout(minilm_model.model, old)


@pytest.fixture(scope="module")
def small_data(minilm_bundle, rotten_tomatoes_small):
    train, _ = rotten_tomatoes_small
    return tokenize(minilm_bundle.tokenizer, train.texts, train.labels, 32)


def _start(model, seed: int) -> AdapterState:
    """A start state with nonzero B factors, so every factor gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    base = extract_state(model)
    return AdapterState(OrderedDict((k, v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype)) for k, v in base.items()), {"round": 1})


def _sequential(model, data, jobs, cfg):
    out = []
    for job in jobs:
        load_state(model, job.start)
        params = list(adapter_parameters(model).values())
        res = local_train(model, params, data, job.indices, cfg, "seq_cls", job.seed, prox_mu=job.prox_mu, num_labels=2)
        out.append((extract_state(model), res))
    return out


# Why SGD in fp32 and AdamW in fp64: the joint pass computes the same math as the clients alone,
# but through differently shaped matmuls (wider padding, bmm), so gradients agree to fp32
# rounding (~1e-9 here), not bit for bit. SGD keeps that at ~1e-9 in the weights. Adam's first
# step is lr * g / (|g| + eps): for an element whose gradient is itself ~1e-9, a rounding-level
# change moves it by up to ~lr/10, so fp32 AdamW differs by ~3e-5 after 4 steps, whichever way
# the matmuls are shaped. In fp64 the same AdamW comparison is exact to 1e-9.
@pytest.mark.parametrize(
    "sizes, optimizer, prox, clip, dtype, tol",
    [
        # equal batch sizes (bmm path), SGD with momentum, the default clip norm
        ([40, 60, 33], "sgd", 0.0, 1.0, torch.float32, 1e-5),
        # a client smaller than a batch (segment path), fedprox term, and a clip norm small enough
        # that every client is clipped by its own norm (a joint clip would show at once)
        ([40, 5, 70], "sgd", 0.1, 0.05, torch.float32, 1e-5),
        # AdamW (the default optimizer): per-client moments and steps
        ([40, 5, 70], "adamw", 0.0, 1.0, torch.float64, 1e-9),
    ],
)
def test_lockstep_equals_sequential(no_dropout_model, small_data, sizes, optimizer, prox, clip, dtype, tol) -> None:
    model = no_dropout_model.model
    if dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to(dtype)
    assert lockstep_unsupported(model) is None
    cfg = TrainConfig(local_steps=4, batch_size=8, lr=2e-3, optimizer=optimizer, momentum=0.9, max_grad_norm=clip)
    jobs, at = [], 0
    for c, n in enumerate(sizes):
        jobs.append(ClientJob(c, _start(model, c), list(range(at, at + n)), task_seed(0, 1, c), prox_mu=prox))
        at += n
    together = lockstep_train(model, small_data, jobs, cfg, num_labels=2)
    alone = _sequential(model, small_data, jobs, cfg)
    for got, (want, res) in zip(together, alone, strict=True):
        assert list(got.state.tensors) == list(want.tensors)
        for k in want.tensors:
            assert got.state[k].dtype == want[k].dtype
            diff = float((got.state[k] - want[k]).abs().max())
            assert diff <= tol, (k, diff)
        assert abs(got.result.train_loss - res.train_loss) <= 1e-5
        assert got.result.steps == res.steps and got.result.num_examples == res.num_examples
    # every client actually moved
    moved = [float(sum((o.state[k] - j.start[k]).abs().sum() for k in j.start.tensors)) for o, j in zip(together, jobs, strict=True)]
    assert min(moved) > 0


def test_lockstep_refuses_dropout(minilm_model, small_data) -> None:
    model = minilm_model.model
    reason = lockstep_unsupported(model)
    assert reason is not None and "dropout" in reason
    with pytest.raises(ValueError, match="dropout"):
        lockstep_train(model, small_data, [ClientJob(0, extract_state(model), [0, 1], 1)], TrainConfig(local_steps=1), num_labels=2)


def test_a_stop_request_ends_training_between_steps(no_dropout_model, small_data) -> None:
    """``should_stop`` is asked before every step, alone and in lockstep: training ends there."""
    from dpeft.train import TrainingStopped

    model = no_dropout_model.model
    cfg = TrainConfig(local_steps=6, batch_size=4, optimizer="sgd", lr=0.01)
    asked: list[int] = []

    def stop_after(n: int):
        def should_stop() -> bool:
            asked.append(1)
            return len(asked) > n

        return should_stop

    params = list(adapter_parameters(model).values())
    with pytest.raises(TrainingStopped):
        local_train(model, params, small_data, list(range(40)), cfg, "seq_cls", 1, num_labels=2, should_stop=stop_after(2))
    assert len(asked) == 3  # two steps ran, the third was refused
    asked.clear()
    jobs = [ClientJob(c, _start(model, c), list(range(10 * c, 10 * c + 10)), task_seed(0, 1, c)) for c in range(2)]
    with pytest.raises(TrainingStopped):
        lockstep_train(model, small_data, jobs, cfg, num_labels=2, should_stop=stop_after(4))
    assert len(asked) == 5
    asked.clear()
    assert local_train(model, params, small_data, list(range(40)), cfg, "seq_cls", 1, num_labels=2, should_stop=stop_after(99)).steps == 6
    assert len(asked) == 6
