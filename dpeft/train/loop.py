"""One client's local training and the global evaluation.

The batch order of a client's local steps is a pure function of (seed, round, client), so a
task gives the same result on whichever worker runs it, and a test can replay the exact
batches in a plain loop. Training runs on the device of the trainable tensors, in
``train.precision``, with ``train.grad_accum_steps`` micro-batches per step and the learning
rate of :mod:`dpeft.train.schedule`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dpeft.config import TrainConfig
from dpeft.data.lazy import Tokens
from dpeft.train.losses import plugin_loss
from dpeft.train.precision import autocast, make_scaler, to_device
from dpeft.train.schedule import LrSchedule


class TrainingStopped(Exception):
    """Training ended before its last step because its ``should_stop`` said so (the worker is stopping)."""


def check_stop(should_stop: Callable[[], bool] | None, step: int) -> None:
    """Raise :class:`TrainingStopped` before step ``step`` when ``should_stop()`` is true."""
    if should_stop is not None and should_stop():
        raise TrainingStopped(f"stopped before local step {step}")


def task_seed(seed: int, round_num: int, client_id: int) -> int:
    """A 63-bit seed for one (round, client) task, stable across processes."""
    x = (seed * 1_000_003 + round_num) * 1_000_033 + client_id
    x ^= x >> 17
    return (x * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)


def batch_schedule(indices: list[int], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``steps`` batches drawn from ``indices`` epoch by epoch without replacement (seeded)."""
    if not indices:
        raise ValueError("a client with no examples cannot train")
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    pool: list[int] = []
    while len(batches) < steps:
        if len(pool) < batch_size:
            perm = torch.randperm(len(indices), generator=gen).tolist()
            pool.extend(indices[i] for i in perm)
        take = min(batch_size, len(pool))
        batches.append(pool[:take])
        pool = pool[take:]
    return batches


def make_optimizer(params: Iterable[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured client optimizer."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class LocalResult:
    """What local training reports back (besides the adapter itself)."""

    num_examples: int
    steps: int
    train_loss: float
    compute_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def label_log_prior(labels: torch.Tensor, indices: list[int], num_labels: int) -> torch.Tensor:
    """log of the client's smoothed label distribution, (counts + 1) / (n + C)."""
    counts = torch.bincount(labels[torch.as_tensor(indices)], minlength=num_labels).double()
    return torch.log((counts + 1.0) / (counts.sum() + num_labels)).float()


def lm_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal-LM batch's token targets: its ``labels`` (-100 on prompt and padding), or every real token."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        return labels
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str, log_prior: torch.Tensor | None) -> torch.Tensor:
    if task == "causal_lm":
        # the model's own (shifted) loss, averaged over the target tokens: the response's for instruction data
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=lm_targets(batch)).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if log_prior is not None:
        logits = logits + log_prior
    return nn.functional.cross_entropy(logits, batch["labels"])


def micro_batches(batch_idx: list[int], k: int) -> list[list[int]]:
    """``batch_idx`` cut into ``k`` consecutive, nearly equal parts (the last one is never empty)."""
    n = len(batch_idx)
    return [batch_idx[i * n // k : (i + 1) * n // k] for i in range(k)]


def causal_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM batch's token targets (unshifted): token-level ``labels`` when the batch has
    them (-100 on prompt and pad tokens), else every non-pad token."""
    labels = batch.get("labels")
    if labels is None or labels.shape != batch["input_ids"].shape:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return labels


def loss_units(batch: dict[str, torch.Tensor], task: str) -> int:
    """What a batch's mean loss averages over: rows (classification) or target tokens (causal LM).

    A causal LM's loss is the mean over the tokens whose shifted label is not -100 (token-level
    ``labels`` when the batch has them, else every non-pad token), as Hugging Face computes it."""
    if task != "causal_lm":
        return int(batch["input_ids"].shape[0])
    return int((causal_targets(batch)[:, 1:] != -100).sum())


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _optimizer_step(
    opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], cfg: TrainConfig, scaler: torch.amp.GradScaler | None
) -> None:
    """Clip (after unscaling fp16 gradients) and step; a scaler skips a step whose gradients overflowed."""
    if scaler is not None:
        scaler.unscale_(opt)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def training_device(params: list[nn.Parameter]) -> torch.device:
    """Where training happens: the device of the trainable tensors (the CPU when there are none)."""
    return params[0].device if params else torch.device("cpu")


def local_train(
    model: nn.Module,
    params: list[nn.Parameter],
    data: Tokens,
    indices: list[int],
    cfg: TrainConfig,
    task: str,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    prox_mu: float = 0.0,
    num_labels: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    round_num: int = 0,
    schedule: LrSchedule | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> LocalResult:
    """Run ``cfg.local_steps`` optimizer steps on the client's examples; the model is updated in place.

    Training happens where ``params`` live (batches are moved there), under ``train.precision``
    (:mod:`dpeft.train.precision`). With ``train.grad_accum_steps`` = k each step's batch runs as
    k micro-batches, each padded to its own longest row; micro-batch losses are weighted by their
    share of the batch's rows (tokens for a causal LM), so the summed gradients are the batch's.
    The prox term and ``penalty()`` (an extra loss term, e.g. hetlora's tail-rank penalty) join the
    last micro-batch once. ``schedule`` sets the learning rate of each
    step from (``round_num``, step); None keeps the optimizer's.

    ``should_stop`` is asked before every step; when it says so, :class:`TrainingStopped` is raised
    (the model is left part-trained)."""
    t0 = time.perf_counter()
    model.train()
    opt = optimizer or make_optimizer(params, cfg)
    device = training_device(params)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    log_prior = None
    if task == "seq_cls" and cfg.loss == "prior_calibrated" and data.labels is not None and num_labels:
        log_prior = label_log_prior(data.labels, indices, num_labels).to(device)
    custom = plugin_loss(cfg, task, num_labels)
    scaler = make_scaler(device, cfg.precision)
    after_step = getattr(model, "after_optimizer_step", None)
    k = cfg.grad_accum_steps
    losses = []
    # dropout in the (frozen) base draws from torch's global RNG: seed it from the task too, so
    # a task's result does not depend on what the process ran before (restored afterwards)
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for step, batch_idx in enumerate(batch_schedule(indices, cfg.local_steps, cfg.batch_size, seed)):
            check_stop(should_stop, step)
            if schedule is not None:
                schedule.apply(opt, round_num, step)
            parts = [data.batch(m) for m in micro_batches(batch_idx, k)] if k > 1 else [data.batch(batch_idx)]
            units = [loss_units(b, task) for b in parts] if k > 1 else [1]
            total_units = sum(units)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for j, (part, n) in enumerate(zip(parts, units, strict=True)):
                last = j == len(parts) - 1
                extra = last and (anchor is not None or penalty is not None)
                if n == 0 and not extra:
                    continue  # nothing to average over (a micro-batch of prompt-only rows)
                loss = torch.zeros((), device=device)
                if n:
                    with autocast(device, cfg.precision):
                        on_device = to_device(part, device)
                        loss = custom(model, on_device) if custom is not None else _loss(model, on_device, task, log_prior)
                    if k > 1:
                        loss = loss * (n / total_units)
                if last and anchor is not None:
                    loss = loss + 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=False))
                if last and penalty is not None:
                    loss = loss + penalty()
                _backward(loss, scaler)
                step_loss += float(loss.detach())
            _optimizer_step(opt, params, cfg, scaler)
            if after_step is not None:
                after_step()  # a native adapter's constraint (LoReFT: R back to orthonormal rows)
            losses.append(step_loss)
    model.eval()
    mean_loss = sum(losses) / len(losses)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"local training diverged (loss {mean_loss})")
    return LocalResult(num_examples=len(indices), steps=len(losses), train_loss=mean_loss, compute_s=time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, data: Tokens, task: str, batch_size: int, precision: str = "fp32") -> dict[str, float]:
    """Mean loss and accuracy over ``data``, on the model's device and in ``precision`` (autocast;
    a worker's model under bf16/fp16 keeps its frozen base in that dtype).

    Causal LMs: per-token loss and next-token accuracy over the target tokens (the responses of
    instruction/chat data, every real token of plain text).

    Batches are formed in order of length (a stable sort of the real token counts), so each is
    cut to a width near its own sequences' and little compute goes to padding: on the default
    task (Rotten Tomatoes, 26 tokens on average in a 64-token window) evaluation takes half the
    time of batches in file order. Loss and accuracy are those of file order up to float rounding
    (another summation order and padded width)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_correct, total = 0.0, 0, 0
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    for start in range(0, len(data), batch_size):
        batch = to_device(data.batch(order[start : start + batch_size]), device)
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()
        if task == "causal_lm":
            logits = logits[:, :-1]
            target = lm_targets(batch)[:, 1:]
            mask = target != -100
            loss = nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            total_loss += float(loss)
            total_correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            total += int(mask.sum())
        else:
            total_loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            total_correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return {"eval_loss": total_loss / max(total, 1), "eval_accuracy": total_correct / max(total, 1)}
