"""Multi-LoRA lockstep training: several clients' local steps as ONE pass through the shared base.

When one worker process hosts several sampled clients of a round, training them one after
another runs the frozen base model K times per step on small batches. Here the K clients'
batches of step s are concatenated into one batch; the frozen base runs once, and every row is
routed through *its own client's* adapter (as multi-tenant PEFT serving systems such as Punica
and S-LoRA do, here for training):

- LoRA linear layers: ``y = base(x) + scale * B_c (A_c x)`` for the rows of client c, computed
  for all clients at once with ``bmm`` over the stacked factors ``A[K, r, in]``, ``B[K, out, r]``
  (a loop over row segments when the clients' batch sizes differ);
- the classification head (a peft ``modules_to_save`` Linear): per-client ``W_c``, ``b_c``.

Each client keeps its own parameter tensors (leaves; the stacks are built each step with
``torch.stack``, so gradients land on each client's own tensors), its own loss (mean over its
own rows, calibrated by its own label prior), its own gradient clipping (by its own norm) and
its own optimizer. Because clients share no trainable parameter and every op of the base works
row by row, the summed loss gives each client exactly the gradient it would get alone, and the
result equals :func:`dpeft.train.loop.local_train` run client after client on the same batches
(tested to 1e-5 in fp32). Dropout must be off (p = 0 everywhere): a joint pass cannot replay
each client's own dropout masks.

Supported: peft LoRA on ``nn.Linear`` layers (no DoRA, not merged) plus ``modules_to_save``
Linear layers, for ``seq_cls`` models, and for ``causal_lm`` models (the LoRA layers routed the
same way; each client's next-token loss is the mean over its own rows' target tokens, as
Hugging Face computes it; the joint batch's extra right padding changes no real token's output
under causal attention). :func:`lockstep_unsupported` says why a model is not.
"""

from __future__ import annotations

import math
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dpeft.config import TrainConfig
from dpeft.data.lazy import Tokens
from dpeft.state import AdapterState
from dpeft.train.loop import (
    LocalResult,
    _optimizer_step,
    batch_schedule,
    causal_targets,
    check_stop,
    label_log_prior,
    loss_units,
    make_optimizer,
    micro_batches,
    training_device,
)
from dpeft.train.precision import autocast, make_scaler, to_device
from dpeft.train.schedule import LrSchedule

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear


@dataclass
class ClientJob:
    """One client's share of a lockstep run."""

    client_id: int
    start: AdapterState  # adapter state to start from (names as extract_state gives them)
    indices: list[int]  # the client's example indices
    seed: int  # batch-order seed (task_seed(seed, round, client))
    prox_mu: float = 0.0
    optimizer_state: dict[str, Any] | None = None
    penalty: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # extra loss term of the client's tensors


@dataclass
class ClientOutcome:
    """A client's trained adapter state and what local_train would have reported."""

    client_id: int
    state: AdapterState
    result: LocalResult
    optimizer_state: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)


@dataclass
class _LoraSite:
    module: LoraLinear
    a_name: str  # structural names (extract_state keys) of the factors
    b_name: str
    scale: float


@dataclass
class _HeadSite:
    module: nn.Module  # the ModulesToSaveWrapper
    w_name: str
    b_name: str | None


def _structure(model: nn.Module) -> tuple[list[_LoraSite], list[_HeadSite], list[str]]:
    """LoRA and head sites of the active adapter, and the names nothing routes (unsupported)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    from dpeft.adapters.selection import _strip

    peft_model = cast("PeftModel", model)  # anything else raises AttributeError below
    adapter = peft_model.active_adapter
    loras: list[_LoraSite] = []
    heads: list[_HeadSite] = []
    covered: set[str] = set()
    for mod_name, module in model.named_modules():
        name = _strip(mod_name)
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            loras.append(_LoraSite(module, a, b, float(module.scaling[adapter])))
            covered.update((a, b))
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            inner = module.modules_to_save[adapter]
            if isinstance(inner, nn.Linear):
                w = f"{name}.weight"
                b = f"{name}.bias" if inner.bias is not None else None
                heads.append(_HeadSite(module, w, b))
                covered.update(n for n in (w, b) if n)
    from dpeft.adapters import adapter_parameters

    unrouted = [n for n in adapter_parameters(peft_model, trainable_only=False) if n not in covered]
    return loras, heads, unrouted


def lockstep_unsupported(model: nn.Module, task: str = "seq_cls") -> str | None:
    """None when :func:`lockstep_train` can train ``model``; otherwise the reason."""
    if task not in ("seq_cls", "causal_lm"):
        return f"task {task!r} (lockstep supports seq_cls and causal_lm)"
    try:
        loras, heads, unrouted = _structure(model)
    except (ImportError, AttributeError) as exc:
        return f"not a peft LoRA model ({exc})"
    if unrouted:
        return f"adapter parameters without a routed implementation: {unrouted[:3]}"
    if not loras:
        return "no LoRA layers"
    adapter = cast("PeftModel", model).active_adapter
    for site in loras:
        m = site.module
        if getattr(m, "merged", False) or getattr(m, "disable_adapters", False):
            return "adapter merged or disabled"
        if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter, False):
            return "LoRA variants (DoRA, ...) are not routed"
        drop = m.lora_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            return "adapter dropout > 0"
    if active_dropout(model):
        return "dropout > 0 in the model (set every nn.Dropout p to 0)"
    return None


def active_dropout(model: nn.Module) -> list[str]:
    """Names of dropout modules with p > 0."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]


def disable_dropout(model: nn.Module) -> dict[str, float]:
    """Set every nn.Dropout's p to 0; returns the old values (for :func:`restore_dropout`)."""
    old = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            old[n] = m.p
            m.p = 0.0
    return old


def restore_dropout(model: nn.Module, old: dict[str, float]) -> None:
    for n, m in model.named_modules():
        if isinstance(m, nn.Dropout) and n in old:
            m.p = old[n]


class _Routing:
    """Which rows belong to which client in the current joint batch."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.equal = len(set(self.sizes)) == 1
        self.bounds = []
        at = 0
        for n in self.sizes:
            self.bounds.append((at, at + n))
            at += n


def _routed_lora(site: _LoraSite, leaves: list[dict[str, torch.Tensor]], routing: _Routing) -> Any:
    def forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        k = len(leaves)
        a = torch.stack([lv[site.a_name] for lv in leaves])  # [K, r, in]
        b = torch.stack([lv[site.b_name] for lv in leaves])  # [K, out, r]
        x = x.to(a.dtype)
        if routing.equal:
            xs = x.reshape(k, -1, x.shape[-1])  # rows are client-major: [K, rows*seq, in]
            y = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            return (result + y.reshape(result.shape) * site.scale).to(dtype)
        parts = [(x[s:e] @ a[c].T) @ b[c].T for c, (s, e) in enumerate(routing.bounds)]
        return (result + torch.cat(parts) * site.scale).to(dtype)

    return forward


def _routed_head(site: _HeadSite, leaves: list[dict[str, torch.Tensor]], routing: _Routing) -> Any:
    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        k = len(leaves)
        w = torch.stack([lv[site.w_name] for lv in leaves])  # [K, out, in]
        bias = torch.stack([lv[site.b_name] for lv in leaves]) if site.b_name else None  # [K, out]
        if routing.equal:
            xs = x.reshape(k, -1, x.shape[-1])
            y = torch.bmm(xs, w.transpose(1, 2))
            if bias is not None:
                y = y + bias[:, None, :]
            return y.reshape(*x.shape[:-1], w.shape[1])
        parts = []
        for c, (s, e) in enumerate(routing.bounds):
            parts.append(nn.functional.linear(x[s:e], w[c], bias[c] if bias is not None else None))
        return torch.cat(parts)

    return forward


@contextmanager
def _patched(
    loras: list[_LoraSite], heads: list[_HeadSite], leaves: list[dict[str, torch.Tensor]], routing: _Routing
) -> Iterator[None]:
    patched: list[nn.Module] = []
    try:
        for site in loras:
            module: nn.Module = site.module  # forward is an assignable attribute of any nn.Module
            module.forward = types.MethodType(_routed_lora(site, leaves, routing), module)
            patched.append(module)
        for hsite in heads:
            hsite.module.forward = types.MethodType(_routed_head(hsite, leaves, routing), hsite.module)
            patched.append(hsite.module)
        yield
    finally:
        for m in patched:
            del m.forward  # back to the class's forward


def lockstep_train(
    model: nn.Module,
    data: Tokens,
    jobs: Sequence[ClientJob],
    cfg: TrainConfig,
    task: str = "seq_cls",
    num_labels: int | None = None,
    trainable: Sequence[str] | None = None,
    keep_optimizer_state: bool = False,
    should_stop: Callable[[], bool] | None = None,
    round_num: int = 0,
    schedule: LrSchedule | None = None,
) -> list[ClientOutcome]:
    """Train ``jobs`` together for ``cfg.local_steps`` steps; the model's own adapter is untouched.

    ``trainable`` names the adapter tensors that train (default: all); the others stay at each
    client's start values. Training runs where the model's adapter lives, in ``train.precision``
    (one gradient scaler per client under fp16), with ``train.grad_accum_steps`` joint
    micro-batches per step (each client's rows cut as :func:`~dpeft.train.loop.local_train` cuts
    them) and the learning rates of ``schedule`` at (``round_num``, step). Raises ValueError when the model is not supported
    (:func:`lockstep_unsupported`), :class:`~dpeft.train.loop.TrainingStopped` when
    ``should_stop()`` (asked before every step) says so.
    """
    reason = lockstep_unsupported(model, task)
    if reason:
        raise ValueError(f"multi-LoRA lockstep training not possible: {reason}")
    if not jobs:
        return []
    t0 = time.perf_counter()
    loras, heads, _ = _structure(model)
    from dpeft.adapters import adapter_parameters

    model_params = adapter_parameters(cast("PeftModel", model))  # the tensors local_train trains and extract_state returns
    names = list(model_params)
    device = training_device(list(model_params.values()))
    train_names = [n for n in names if trainable is None or n in set(trainable)]
    leaves: list[dict[str, torch.Tensor]] = []
    opts = []
    anchors: list[list[torch.Tensor] | None] = []
    for job in jobs:
        lv: dict[str, torch.Tensor] = {}
        for n in names:
            p = model_params[n]
            lv[n] = job.start[n].detach().to(device=p.device, dtype=p.dtype).clone().requires_grad_(n in train_names)
        leaves.append(lv)
        params = [lv[n] for n in train_names]
        opt = make_optimizer(params, cfg)
        if job.optimizer_state is not None:
            opt.load_state_dict(job.optimizer_state)
        opts.append(opt)
        anchors.append([p.detach().clone() for p in params] if job.prox_mu > 0 else None)
    priors: list[torch.Tensor | None] = []
    for job in jobs:
        if cfg.loss == "prior_calibrated" and data.labels is not None and num_labels:
            priors.append(label_log_prior(data.labels, job.indices, num_labels).to(device))
        else:
            priors.append(None)
    schedules = [batch_schedule(job.indices, cfg.local_steps, cfg.batch_size, job.seed) for job in jobs]
    causal = task == "causal_lm"
    scalers = [make_scaler(device, cfg.precision) for _ in jobs]  # one per client, as when trained alone
    k = cfg.grad_accum_steps
    losses: list[list[float]] = [[] for _ in jobs]
    was_training = model.training
    model.train()
    try:
        for step in range(cfg.local_steps):
            check_stop(should_stop, step)
            for opt in opts:
                if schedule is not None:
                    schedule.apply(opt, round_num, step)
                opt.zero_grad(set_to_none=True)
            rows = [schedules[c][step] for c in range(len(jobs))]
            micro = [micro_batches(r, k) for r in rows]  # per client, cut as local_train cuts it
            # what each client's step loss averages over: rows, or target tokens of a causal LM
            units = [[loss_units(data.batch(m), task) if m else 0 for m in parts] for parts in micro] if k > 1 else None
            step_loss = [0.0] * len(jobs)
            for j in range(k):
                part = [micro[c][j] for c in range(len(jobs))]
                routing = _Routing([len(r) for r in part])
                batch = to_device(data.batch([i for r in part for i in r]), device)
                # patched through the backward too: gradient checkpointing re-runs the forward there
                with _patched(loras, heads, leaves, routing):
                    with autocast(device, cfg.precision):
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    if logits.dtype in (torch.float16, torch.bfloat16):
                        logits = logits.float()  # the loss in float32, as autocast computes cross_entropy
                    targets = causal_targets(batch) if causal else batch["labels"]
                    total = logits.new_zeros(())
                    per_client = []
                    for c, (s, e) in enumerate(routing.bounds):
                        loss = logits.new_zeros(())
                        share = (e - s) if units is None else units[c][j]
                        if share > 0:
                            if causal:  # next-token targets of this client's rows
                                lg, tg = logits[s:e, :-1], targets[s:e, 1:]
                                loss = nn.functional.cross_entropy(
                                    lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100
                                )
                            else:
                                lg = logits[s:e]
                                if priors[c] is not None:
                                    lg = lg + priors[c]
                                loss = nn.functional.cross_entropy(lg, targets[s:e])
                            if units is not None:
                                loss = loss * (share / sum(units[c]))
                        anchor = anchors[c]
                        if anchor is not None and j == k - 1:
                            params = [leaves[c][n] for n in train_names]
                            loss = loss + 0.5 * jobs[c].prox_mu * sum(
                                ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                            )
                        if jobs[c].penalty is not None and j == k - 1:
                            loss = loss + jobs[c].penalty(leaves[c])  # type: ignore[misc]
                        per_client.append(loss)
                        scaler = scalers[c]
                        total = total + (scaler.scale(loss) if scaler is not None else loss)
                    if total.requires_grad:
                        total.backward()
                for c, loss in enumerate(per_client):
                    step_loss[c] += float(loss.detach())
            for c, opt in enumerate(opts):
                _optimizer_step(opt, [leaves[c][n] for n in train_names], cfg, scalers[c])  # each client by its own norm
                losses[c].append(step_loss[c])
    finally:
        model.train(was_training)
    model.eval()
    elapsed = time.perf_counter() - t0
    out = []
    for c, job in enumerate(jobs):
        mean_loss = sum(losses[c]) / len(losses[c])
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"client {job.client_id}: local training diverged (loss {mean_loss})")
        state = AdapterState(OrderedDict((n, leaves[c][n].detach().cpu().clone()) for n in names), dict(job.start.meta))
        result = LocalResult(
            num_examples=len(job.indices), steps=len(losses[c]), train_loss=mean_loss, compute_s=elapsed / len(jobs)
        )
        out.append(ClientOutcome(job.client_id, state, result, opts[c].state_dict() if keep_optimizer_state else None, losses[c]))
    return out
