"""Lockstep multi-LoRA training with gradient accumulation, gradient checkpointing and bf16."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch

from dpeft.adapters import adapter_parameters, extract_state, load_state
from dpeft.config import TrainConfig
from dpeft.data import tokenize
from dpeft.state import AdapterState
from dpeft.train.loop import local_train, task_seed
from dpeft.train.multi_lora import ClientJob, disable_dropout, lockstep_train
from dpeft.train.precision import enable_gradient_checkpointing, prepare_for_training

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(minilm_bundle, rotten_tomatoes_small):
    train, _ = rotten_tomatoes_small
    data = tokenize(minilm_bundle.tokenizer, train.texts, train.labels, 24)
    model = copy.deepcopy(minilm_bundle.model)
    disable_dropout(model)
    g = torch.Generator().manual_seed(3)
    jobs = []
    for c, (lo, hi) in enumerate([(0, 40), (40, 46)]):  # the second client is smaller than a batch
        base = extract_state(model)
        start = AdapterState(OrderedDict((k, v + 0.02 * torch.randn(v.shape, generator=g)) for k, v in base.items()))
        jobs.append(ClientJob(c, start, list(range(lo, hi)), task_seed(0, 1, c), prox_mu=0.1 * c))
    return model, data, jobs


def test_lockstep_with_accumulation_and_checkpointing_equals_plain_sequential(setup) -> None:
    model, data, jobs = setup
    cfg = TrainConfig(local_steps=2, batch_size=8, lr=0.05, optimizer="sgd", max_grad_norm=0.05)
    alone = []
    for job in jobs:
        load_state(model, job.start)
        local_train(
            model,
            list(adapter_parameters(model).values()),
            data,
            job.indices,
            cfg,
            "seq_cls",
            job.seed,
            prox_mu=job.prox_mu,
            num_labels=2,
        )
        alone.append(extract_state(model))
    saver = copy.deepcopy(model)
    enable_gradient_checkpointing(saver)
    together = lockstep_train(saver, data, jobs, TrainConfig(**{**cfg.__dict__, "grad_accum_steps": 3}), num_labels=2)
    for got, want in zip(together, alone, strict=True):
        assert max(float((got.state[k] - want[k]).abs().max()) for k in want.tensors) < 1e-5


def test_lockstep_bf16_trains_fp32_masters(setup) -> None:
    model, data, jobs = setup
    cfg = TrainConfig(local_steps=1, batch_size=8, lr=0.05, precision="bf16")
    low = prepare_for_training(copy.deepcopy(model), torch.device("cpu"), cfg)
    out = lockstep_train(low, data, jobs, cfg, num_labels=2)
    for o, job in zip(out, jobs, strict=True):
        assert torch.isfinite(torch.tensor(o.result.train_loss))
        assert all(t.dtype == torch.float32 for t in o.state.tensors.values())
        assert max(float((o.state[k] - job.start[k]).abs().max()) for k in job.start.tensors) > 0


def test_causal_lm_lockstep_equals_sequential() -> None:
    """SmolLM2 (2 layers): two clients' next-token training in one pass == one after another,
    also with 2 micro-batches per step (weighted by target tokens)."""
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, DataConfig, ModelConfig
    from dpeft.data import load_dataset

    bundle = build_model(
        ModelConfig(name="smollm2", task="causal_lm", max_length=16, layers=2, dropout=0.0), AdapterConfig(), None, 0
    )
    train, _ = load_dataset(DataConfig(max_train_examples=12, test_examples=8), 0, need_labels=False)
    data = tokenize(bundle.tokenizer, train.texts, None, 16)
    model = bundle.model
    g = torch.Generator().manual_seed(4)
    base = extract_state(model)
    jobs = [
        ClientJob(
            c,
            AdapterState(OrderedDict((k, v + 0.02 * torch.randn(v.shape, generator=g)) for k, v in base.items())),
            idx,
            task_seed(0, 1, c),
        )
        for c, idx in enumerate([list(range(0, 8)), list(range(8, 12))])
    ]
    cfg = TrainConfig(local_steps=2, batch_size=4, lr=0.05, optimizer="sgd", max_grad_norm=1.0)
    alone = []
    for job in jobs:
        load_state(model, job.start)
        local_train(model, list(adapter_parameters(model).values()), data, job.indices, cfg, "causal_lm", job.seed)
        alone.append(extract_state(model))
    for k in (1, 2):
        together = lockstep_train(model, data, jobs, TrainConfig(**{**cfg.__dict__, "grad_accum_steps": k}), task="causal_lm")
        for got, want, job in zip(together, alone, jobs, strict=True):
            assert max(float((got.state[n] - want[n]).abs().max()) for n in want.tensors) < 1e-5
            assert max(float((got.state[n] - job.start[n]).abs().max()) for n in want.tensors) > 1e-4
