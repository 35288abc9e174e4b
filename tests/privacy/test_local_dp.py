"""Local DP-SGD on the peft model: Opacus' per-example gradients equal one-example backward passes
(the hooks see the adapter as trained), clipping bounds each example's contribution, the hooks are
gone afterwards, and a DP-trained adapter learns on a tiny slice with small noise."""

from __future__ import annotations

import pytest
import torch

from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
from dpeft.config import AdapterConfig, DataConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig
from dpeft.data import load_dataset, tokenize_dataset
from dpeft.privacy.local_dp import dp_local_train, per_example_loss, privatize_gradients
from dpeft.train.loop import evaluate


@pytest.fixture(scope="module")
def tiny():
    """MiniLM without dropout (per-example gradients are then deterministic), 48 examples of 32 tokens."""
    torch.set_num_threads(1)
    cfg = RunConfig(model=ModelConfig(max_length=32, dropout=0.0), data=DataConfig(max_train_examples=48, test_examples=8))
    bundle = build_model(cfg.model, AdapterConfig(), 2, 0)
    train, _ = load_dataset(cfg.data, seed=0)
    return bundle, tokenize_dataset(bundle.tokenizer, train, cfg), extract_state(bundle.model)


def test_privatize_clips_every_example_to_the_bound() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    g = torch.Generator().manual_seed(0)
    p.grad_sample = torch.randn(4, 3, 2, generator=g) * torch.tensor([5.0, 0.5, 2.0, 0.1]).view(4, 1, 1)  # type: ignore[attr-defined]
    samples = p.grad_sample.clone()
    largest, clipped = privatize_gradients([p], clip=1.0, noise_std=0.0, expected_batch=4.0, gen=g)
    norms = samples.flatten(1).norm(dim=1)
    expected = sum(s * min(1.0, 1.0 / float(n)) for s, n in zip(samples, norms, strict=True)) / 4.0
    assert torch.allclose(p.grad, expected, atol=1e-6)
    assert clipped == int((norms > 1.0).sum()) >= 2 and largest == pytest.approx(float(norms.max()))
    assert p.grad_sample is None  # type: ignore[attr-defined]
    # one example's contribution, whatever its gradient, moves the sum by at most the bound
    q = torch.nn.Parameter(torch.zeros(3, 2))
    q.grad_sample = samples[1:].clone()  # type: ignore[attr-defined]
    privatize_gradients([q], clip=1.0, noise_std=0.0, expected_batch=4.0, gen=g)
    assert float(((p.grad - q.grad) * 4.0).norm()) <= 1.0 + 1e-6


def test_opacus_per_example_gradients_on_the_peft_adapter_are_exact(tiny) -> None:
    from opacus import GradSampleModule

    bundle, data, start = tiny
    model = bundle.model
    load_state(model, start)
    params = list(adapter_parameters(model).values())
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        per_example_loss(gsm, data.batch([0, 1, 2]), "seq_cls").sum().backward()
        samples = [p.grad_sample.detach().clone() for p in params]
    finally:
        gsm._close()
    for i in range(3):
        for p in params:
            p.grad = None
        per_example_loss(model, data.batch([i]), "seq_cls").sum().backward()
        for p, s in zip(params, samples, strict=True):
            assert torch.allclose(p.grad, s[i], atol=1e-5), "per-example gradient differs from the example's own backward pass"
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in params)  # hooks removed
    model.eval()


def test_dp_sgd_adapter_learns_with_small_noise(tiny) -> None:
    bundle, data, start = tiny
    model = bundle.model
    load_state(model, start)
    params = list(adapter_parameters(model).values())
    before = evaluate(model, data, "seq_cls", 48)
    train = TrainConfig(local_steps=8, batch_size=16, lr=5e-3, loss="cross_entropy")
    privacy = PrivacyConfig(mode="local", clip_norm=1.0, noise_multiplier=0.3)
    result = dp_local_train(
        model, params, data, list(range(len(data))), train, privacy, "seq_cls", generator=torch.Generator().manual_seed(0)
    )
    after = evaluate(model, data, "seq_cls", 48)
    assert after["eval_loss"] < before["eval_loss"] - 0.01, (before, after)
    m = result.metrics
    assert m["dp_sample_rate"] == pytest.approx(16 / 48) and m["dp_steps"] == 8 and 0 < m["dp_task_epsilon"] < float("inf")
    assert m["dp_clipped_examples"] > 0  # the bound was active
    load_state(model, start)
