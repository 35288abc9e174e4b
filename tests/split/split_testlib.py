"""Helpers for split tests: a cloud and an edge in one process over a real loopback gRPC stream."""

from __future__ import annotations

import torch

from dpeft.split.local import loopback  # noqa: F401 - re-exported for the tests


def reference_step(model, params, batch, train_cfg):
    """One monolithic step in eval mode: loss, grads, updated params (mirrors the edge's step)."""
    from dpeft.train.loop import make_optimizer

    opt = make_optimizer(params.values(), train_cfg)
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    if train_cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), train_cfg.max_grad_norm)
    opt.step()
    return float(loss.detach()), logits.detach(), grads, {k: p.detach().clone() for k, p in params.items()}
