"""Local (record-level) DP-SGD on one client: Opacus per-sample gradients of the adapter's trainable tensors.

Each step samples its batch by Poisson sampling (every example of the client with probability
``q = train.batch_size / n``, so the batch size varies), computes each example's gradient of
the trainable adapter tensors with Opacus' ``GradSampleModule`` (hooks attached to the model
as it is, on its device, with the adapter loaded), clips each example's gradient to
``privacy.clip_norm`` over all trainable tensors together, sums them, adds Gaussian noise of
standard deviation ``privacy.noise_multiplier * clip_norm`` and divides by the *expected*
batch size; the optimizer steps on that. Sampling and noise draw from the operating system's
randomness, never from the run seed: the coordinator knows the seed, and noise it could
recompute would protect nothing against it.

The hooks are removed after the task, so the worker's model is unchanged for other tasks.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpeft.config import PrivacyConfig, TrainConfig
from dpeft.data.lazy import Tokens
from dpeft.privacy.accountant import local_epsilon
from dpeft.privacy.local_accounting import RATE_KEY, STEPS_KEY, TASK_EPSILON_KEY
from dpeft.train.loop import LocalResult, check_stop, lm_targets, make_optimizer, training_device
from dpeft.train.precision import to_device
from dpeft.train.schedule import LrSchedule


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Each example's loss (a causal LM's: the mean over its target tokens), shape ``[batch]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task != "causal_lm":
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
    target = lm_targets(batch)[:, 1:]
    tokens = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none", ignore_index=-100)
    count = (target != -100).sum(1).clamp(min=1)
    return tokens.sum(1) / count


def privatize_gradients(
    params: list[nn.Parameter], clip: float, noise_std: float, expected_batch: float, gen: torch.Generator
) -> tuple[float, int]:
    """Turn each parameter's ``grad_sample`` into its DP gradient in ``grad``: per-example clipping
    to ``clip``, sum, Gaussian noise of ``noise_std``, divided by ``expected_batch``.

    Returns (largest per-example norm before clipping, examples clipped). Parameters without
    ``grad_sample`` (an empty batch) get noise alone."""
    samples = [getattr(p, "grad_sample", None) for p in params]
    present = [s for s in samples if s is not None]
    largest, clipped = 0.0, 0
    factor = None
    if present:
        sq = torch.zeros(present[0].shape[0], dtype=torch.float64, device=present[0].device)
        for s in present:
            sq += s.detach().reshape(s.shape[0], -1).double().pow(2).sum(1)
        norms = sq.sqrt()
        factor = (clip / (norms + 1e-12)).clamp(max=1.0)
        largest, clipped = float(norms.max()), int((norms > clip).sum())
    for p, s in zip(params, samples, strict=True):
        total = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        if s is not None and factor is not None:
            total += torch.einsum("i,i...->...", factor, s.detach().double())
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * noise_std
        p.grad = ((total + noise.to(p.device)) / expected_batch).to(p.dtype)
        p.grad_sample = None  # type: ignore[attr-defined]
    return largest, clipped


def dp_local_train(
    model: nn.Module,
    params: list[nn.Parameter],
    data: Tokens,
    indices: list[int],
    cfg: TrainConfig,
    privacy: PrivacyConfig,
    task: str,
    optimizer: torch.optim.Optimizer | None = None,
    should_stop: Callable[[], bool] | None = None,
    round_num: int = 0,
    schedule: LrSchedule | None = None,
    generator: torch.Generator | None = None,
) -> LocalResult:
    """``cfg.local_steps`` DP-SGD steps on the client's examples (see the module docstring); the
    model is updated in place. The result's metrics carry the sampling rate, the steps and this
    task's epsilon. ``generator``: the source of the batches and the noise (tests); None = seeded
    from the operating system's randomness."""
    from opacus import GradSampleModule  # here: only DP-SGD workers need opacus

    if not indices:
        raise ValueError("a client with no examples cannot train")
    assert privacy.noise_multiplier is not None
    t0 = time.perf_counter()
    clip, z = float(privacy.clip_norm), float(privacy.noise_multiplier)
    device = training_device(params)
    opt = optimizer or make_optimizer(params, cfg)
    n = len(indices)
    rate = min(1.0, cfg.batch_size / n)
    expected = rate * n
    gen = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
    pool = torch.as_tensor(indices)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    losses: list[float] = []
    largest, clipped, seen = 0.0, 0, 0
    model.train()
    try:
        for step in range(cfg.local_steps):
            check_stop(should_stop, step)
            if schedule is not None:
                schedule.apply(opt, round_num, step)
            chosen = pool[torch.rand(n, generator=gen) < rate].tolist()
            opt.zero_grad(set_to_none=True)
            if chosen:
                batch = to_device(data.batch(chosen), device)
                loss = per_example_loss(gsm, batch, task).sum()
                with warnings.catch_warnings():  # Opacus' hooks on a frozen base: "no inputs require gradients" is expected
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(float(loss.detach()) / len(chosen))
                seen += len(chosen)
            big, count = privatize_gradients(params, clip, z * clip, expected, gen)
            largest, clipped = max(largest, big), clipped + count
            opt.step()
    finally:
        gsm._close()  # hooks and grad_sample attributes gone: the model is the worker's plain model again
        model.eval()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    if losses and not math.isfinite(mean_loss):
        raise FloatingPointError(f"local DP-SGD diverged (loss {mean_loss})")
    metrics: dict[str, Any] = {
        RATE_KEY: rate,
        STEPS_KEY: float(cfg.local_steps),
        TASK_EPSILON_KEY: local_epsilon(rate, z, cfg.local_steps, privacy.delta, privacy.accountant),
        "dp_max_example_norm": largest,
        "dp_clipped_examples": float(clipped),
        "dp_examples": float(seen),
    }
    return LocalResult(
        num_examples=n, steps=cfg.local_steps, train_loss=mean_loss, compute_s=time.perf_counter() - t0, metrics=metrics
    )
