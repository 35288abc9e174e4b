"""Mixed precision, gradient checkpointing and gradient accumulation in local training (CPU, tiny)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
from dpeft.config import ModelConfig, TrainConfig
from dpeft.data import load_dataset, tokenize
from dpeft.state import AdapterState
from dpeft.train.loop import _loss, local_train, loss_units, micro_batches
from dpeft.train.multi_lora import disable_dropout
from dpeft.train.precision import enable_gradient_checkpointing, prepare_for_training

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(minilm_bundle, rotten_tomatoes_small):
    train, _ = rotten_tomatoes_small
    return tokenize(minilm_bundle.tokenizer, train.texts, train.labels, 24)


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2 with its first 2 layers, dropout off, 8 texts of 16 tokens."""
    from dpeft.config import AdapterConfig, DataConfig

    model_cfg = ModelConfig(name="smollm2", task="causal_lm", max_length=16, layers=2, dropout=0.0)
    bundle = build_model(model_cfg, AdapterConfig(), None, 0)
    train, _ = load_dataset(DataConfig(max_train_examples=8, test_examples=8), 0, need_labels=False)
    return bundle, tokenize(bundle.tokenizer, train.texts, None, 16)


def _copy_without_dropout(bundle):
    model = copy.deepcopy(bundle.model)
    disable_dropout(model)
    _nudge(model)
    return model


def _nudge(model) -> None:
    """Nonzero B factors, so every factor gets a gradient."""
    g = torch.Generator().manual_seed(1)
    state = extract_state(model)
    load_state(model, AdapterState(OrderedDict((k, v + 0.02 * torch.randn(v.shape, generator=g)) for k, v in state.items())))


def _grads(model, batch, task: str, layer=None) -> dict[str, torch.Tensor]:
    """Adapter gradients of one batch (``layer``: count its forward calls into ``model.calls``)."""
    calls = []
    hook = layer.register_forward_hook(lambda *a: calls.append(1)) if layer is not None else None
    model.train()
    params = adapter_parameters(model)
    for p in params.values():
        p.grad = None
    _loss(model, batch, task, None).backward()
    model.eval()
    if hook is not None:
        hook.remove()
    model.calls = len(calls)
    return {k: p.grad.detach().clone() for k, p in params.items()}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_step_trains_and_keeps_fp32_masters(minilm_bundle, data, precision) -> None:
    model = copy.deepcopy(minilm_bundle.model)
    cfg = TrainConfig(local_steps=2, batch_size=8, lr=0.01, precision=precision)
    prepare_for_training(model, torch.device("cpu"), cfg)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    base_weight = model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert base_weight.dtype == low  # the frozen base is stored in the compute dtype
    params = adapter_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())  # LoRA and the trained head copy
    before = extract_state(model)
    res = local_train(model, list(params.values()), data, list(range(32)), cfg, "seq_cls", seed=3, num_labels=2)
    assert res.steps == 2 and torch.isfinite(torch.tensor(res.train_loss))
    after = extract_state(model)
    assert all(t.dtype == torch.float32 for t in after.tensors.values())  # what travels stays fp32
    assert max(float((after[k] - before[k]).abs().max()) for k in after.tensors) > 0


def test_grad_accumulation_equals_one_batch(minilm_bundle, data) -> None:
    """4 micro-batches (each padded to its own longest row) == one batch of 16: same weights after
    2 steps, with the prior-calibrated loss, a prox term and a clip norm small enough to bind."""
    start = _copy_without_dropout(minilm_bundle)
    out = []
    for k in (1, 4):
        model = copy.deepcopy(start)
        params = list(adapter_parameters(model).values())
        cfg = TrainConfig(local_steps=2, batch_size=16, lr=0.05, optimizer="sgd", max_grad_norm=0.05, grad_accum_steps=k)
        local_train(model, params, data, list(range(64)), cfg, "seq_cls", seed=5, prox_mu=0.1, num_labels=2)
        out.append(extract_state(model))
    worst = max(float((out[0][k] - out[1][k]).abs().max()) for k in out[0].tensors)
    assert worst < 1e-5
    moved = max(float((out[0][k] - extract_state(start)[k]).abs().max()) for k in out[0].tensors)
    assert moved > 1e-3  # the comparison is about real steps


def test_micro_batches_are_trimmed_and_weighted(data) -> None:
    idx = list(range(10))
    parts = micro_batches(idx, 3)
    assert [len(p) for p in parts] == [3, 3, 4] and sum(parts, []) == idx
    widths = [data.batch(p)["input_ids"].shape[1] for p in parts]
    assert max(widths) == data.batch(idx)["input_ids"].shape[1] and all(
        w == int(data.batch(p)["attention_mask"].sum(1).max()) for w, p in zip(widths, parts, strict=True)
    )
    assert loss_units(data.batch(parts[0]), "seq_cls") == 3


def test_gradient_checkpointing_same_gradients_minilm(minilm_bundle, data) -> None:
    model = _copy_without_dropout(minilm_bundle)
    batch = data.batch(list(range(8)))
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
    plain = _grads(model, batch, "seq_cls", layer)
    assert model.calls == 1
    enable_gradient_checkpointing(model)
    ckpt = _grads(model, batch, "seq_cls", layer)
    assert model.calls == 2  # the layer's forward ran again in the backward pass: checkpointed
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-5


def test_gradient_checkpointing_same_gradients_smollm2(smollm) -> None:
    bundle, tokens = smollm
    model = _copy_without_dropout(bundle)
    batch = tokens.batch(list(range(4)))
    layer = model.get_base_model().model.layers[0].self_attn
    plain = _grads(model, batch, "causal_lm", layer)
    enable_gradient_checkpointing(model)
    ckpt = _grads(model, batch, "causal_lm", layer)
    assert model.calls == 2
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-5


def test_grad_accumulation_weighs_tokens_smollm2(smollm) -> None:
    """Causal LM micro-batches are weighted by their target tokens, not their rows."""
    bundle, tokens = smollm
    start = _copy_without_dropout(bundle)
    out = []
    for k in (1, 2):
        model = copy.deepcopy(start)
        params = list(adapter_parameters(model).values())
        cfg = TrainConfig(local_steps=1, batch_size=4, lr=0.05, optimizer="sgd", max_grad_norm=None, grad_accum_steps=k)
        local_train(model, params, tokens, list(range(8)), cfg, "causal_lm", seed=2)
        out.append(extract_state(model))
    assert max(float((out[0][k] - out[1][k]).abs().max()) for k in out[0].tensors) < 1e-5
