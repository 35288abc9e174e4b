"""The shared core budget of work-conserving simulation (:mod:`dpeft.train.cores`).

Real processes contend for the budget file; a training run whose torch thread count changes
between steps (as a work-conserving worker's does) gives the adapter of a one-thread run to
fp32 rounding, on MiniLM (seq_cls) and SmolLM2 (causal LM).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import random
import time

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state
from dpeft.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.train.cores import CoreBudget, budgeted_evaluation, fair_shares
from dpeft.train.loop import local_train

#: work conservation changes intra-op thread counts between steps; CPU kernels (matmul weight
#: gradients, reductions) then sum in another order. Plain SGD keeps that at fp32 rounding
#: (ABS_TOLERANCE); AdamW divides each gradient entry by its running RMS, so an entry whose
#: gradient is ~0 can move by up to lr instead: its adapters agree to REL_TOLERANCE of the update
#: (L2 norm of the difference over the L2 norm of what training changed; measured ~1e-4)
ABS_TOLERANCE = 1e-6
REL_TOLERANCE = 1e-3


def test_fair_shares_split_the_budget_among_busy_slots() -> None:
    assert fair_shares(4, [1, 1, 0], [0, 0, 0], [0, 0, 0]) == [2, 2, 0]
    assert fair_shares(4, [1, 0, 0], [0, 0, 0], [0, 0, 0]) == [4, 0, 0]  # a lone worker takes every core
    assert fair_shares(3, [1, 1, 1], [0, 0, 0], [0, 0, 1]) == [1, 1, 1]
    assert fair_shares(5, [1, 1, 1], [0, 0, 0], [0, 0, 1]) == [2, 1, 2]  # the prioritised slot first
    # oversubscribed: 2 cores, 4 busy slots; those already holding a core keep it
    assert fair_shares(2, [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]) == [0, 0, 1, 1]
    assert sum(fair_shares(7, [1] * 5, [0] * 5, [0] * 5)) == 7


def _contend(path: str, slot: int, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    budget = CoreBudget(path, slot)
    end = time.time() + seconds
    while time.time() < end:
        budget.acquire()
        assert 1 <= torch.get_num_threads() == budget.threads
        time.sleep(rng.random() * 0.004)  # a "step"
        if rng.random() < 0.3:
            budget.release()
            time.sleep(rng.random() * 0.004)
    budget.release()


def test_processes_never_claim_more_than_the_budget_together(tmp_path) -> None:
    path = tmp_path / "cores.budget"
    CoreBudget.create(path, 3, 5)  # 5 processes, 3 cores: oversubscribed
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_contend, args=(str(path), i, 1.5, i)) for i in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    stats = CoreBudget(path, 0).stats()
    assert stats["peak"] <= 3 and stats["claimed"] == 0
    assert all(s > 0 for s in stats["steps"])  # nobody starved
    assert max(stats["max_threads"]) >= 2  # and cores freed by idle processes were taken over


def test_a_lone_participant_grows_when_others_release(tmp_path) -> None:
    path = tmp_path / "cores.budget"
    CoreBudget.create(path, 4, 3)
    a, b, evaluation = CoreBudget(path, 0), CoreBudget(path, 1), CoreBudget(path, 2, priority=1)
    before = torch.get_num_threads()
    try:
        assert a.acquire() == 4
        assert b.try_acquire() == 0  # its share is still held by a, until a's next step
        assert a.acquire() == 2 and b.acquire() == 2
        b.release()
        assert a.acquire() == 4
        # the coordinator's evaluation waits for its share, then runs each batch on it
        assert evaluation.try_acquire() == 0
        a.acquire()
        seen: list[int] = []
        model = torch.nn.Linear(2, 2)
        run = budgeted_evaluation(
            lambda s: (model(torch.zeros(1, 2)), seen.append(torch.get_num_threads()))[1] or {}, model, evaluation
        )
        run(None)
        assert seen == [2] and evaluation.stats()["claimed"] == 2  # a still holds 2; the evaluation gave its 2 back
    finally:
        torch.set_num_threads(before)


def _train(model, data, cfg, threads_per_step: list[int], task: str, seed: int):
    params = list(adapter_parameters(model).values())
    steps = iter(threads_per_step)

    def switch() -> bool:
        torch.set_num_threads(next(steps))
        return False

    local_train(
        model,
        params,
        data,
        list(range(len(data))),
        cfg,
        task,
        seed=seed,
        num_labels=2 if task == "seq_cls" else None,
        should_stop=switch,
    )
    return extract_state(model)


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_changing_threads_between_steps_gives_the_same_adapter(minilm_bundle, rotten_tomatoes_small, task) -> None:
    before = torch.get_num_threads()
    try:
        if task == "seq_cls":
            train, _ = rotten_tomatoes_small
            base = minilm_bundle.model
            data = tokenize(minilm_bundle.tokenizer, train.texts[:32], train.labels[:32], 24)
        else:
            bundle = build_model(ModelConfig(name="smollm2", task="causal_lm", max_length=16, layers=2), AdapterConfig(), None, 0)
            train, _ = load_dataset(DataConfig(max_train_examples=8, test_examples=8), 0, need_labels=False)
            base, data = bundle.model, tokenize(bundle.tokenizer, train.texts, None, 16)
        start = extract_state(base)
        out = {}
        for optimizer in ("sgd", "adamw"):
            cfg = TrainConfig(local_steps=3, batch_size=8, lr=0.01, optimizer=optimizer)
            fixed = _train(copy.deepcopy(base), data, cfg, [1, 1, 1], task, 4)
            varying = _train(copy.deepcopy(base), data, cfg, [2, 1, 2], task, 4)
            out[optimizer] = (fixed, varying)
    finally:
        torch.set_num_threads(before)
    fixed, varying = out["sgd"]
    assert max(float((fixed[k] - varying[k]).abs().max()) for k in fixed.tensors) <= ABS_TOLERANCE
    fixed, varying = out["adamw"]
    diff = sum(float((fixed[k] - varying[k]).pow(2).sum()) for k in fixed.tensors) ** 0.5
    update = sum(float((fixed[k] - start[k]).pow(2).sum()) for k in fixed.tensors) ** 0.5
    assert update > 0 and diff / update <= REL_TOLERANCE, diff / update


def test_cores_held_by_a_dead_process_come_back(tmp_path) -> None:
    path = tmp_path / "cores.budget"
    CoreBudget.create(path, 2, 2)
    holder = mp.get_context("fork").Process(target=lambda: (CoreBudget(path, 0).acquire(), None)[1])
    holder.start()
    holder.join(30)
    assert CoreBudget(path, 0).stats()["claimed"] == 2  # it died without giving them back
    before = torch.get_num_threads()
    try:
        assert CoreBudget(path, 1).acquire() == 2  # freed after about a second of waiting
    finally:
        torch.set_num_threads(before)
