"""LoRA-FAIR (Bian et al., ICCV 2025): averaged LoRA factors with a server-side residual correction of B.

Clients train the global factors and send deltas, as for FedAvg; client ``k``'s factors are
``A_k = A + dA_k``, ``B_k = B + dB_k``, with normalised example weights ``p_k``. The server
forms the averages ``A_bar = sum_k p_k A_k`` and ``B_bar = sum_k p_k B_k`` and the ideal
update ``dW = sum_k p_k B_k A_k`` (folded as updates arrive: one ``(out, in)`` float64 matrix
per module), then looks for a residual ``dB`` with (the paper's Eq. 8)::

    dB* = argmin_dB  S(dW, (B_bar + dB) A_bar) + lam * ||dB||_F

and publishes ``(B_bar + dB*, A_bar)`` as the next global: clients start the next round from
the refined factors themselves (the paper's "Avg-Initial"), so no extra tensor is sent.

``similarity`` picks ``S``:

- ``cosine`` (the paper's): ``S = 1 - cos(dW, (B_bar + dB) A_bar)`` over the flattened
  matrices, minimised from ``dB = 0`` by ``steps`` steps of ``solver``:

  - ``sgd`` (the paper's form): plain gradient descent, ``dB <- dB - step_lr * grad``, the last
    iterate is the result;
  - ``adam`` (default): Adam with step size ``step_lr`` times the RMS of ``B_bar`` (so it does
    not depend on the factors' scale), keeping the best iterate (never worse than ``dB = 0``).
- ``frobenius``: ``S = ||dW - (B_bar + dB) A_bar||_F^2`` with ``lam * ||dB||_F^2``, a ridge
  least-squares problem solved in closed form,
  ``dB = (dW - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam I)^-1``.

With ``server_lr`` = η the averages are ``A + η mean(dA_k)`` (likewise B) and the target
``P + η (dW - P)`` (``P = B A``, the current global product). Plain tensors are FedAvg'd.
``last_metrics`` reports ``lora_fair_residual_before`` / ``_after``: the relative Frobenius
error ``||dW - B A_bar|| / ||dW||`` over all modules, before and after the correction.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dpeft.config import RunConfig
from dpeft.config.options import option
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import StreamingWeightedMean, apply_delta, restrict
from dpeft.strategies.base import Aggregator, ClientUpdate, register_strategy, unwrap
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.lora import factor_matrices, lora_pairs, refuse_secure_aggregation, require_lora_method
from dpeft.strategies.lora_products import ProductMeanAggregator, step_products


@dataclass(kw_only=True)
class LoRAFairOptions(FedAvgOptions):
    """Options of lora_fair."""

    lam: float = option(
        0.01,
        "regularisation weight lambda on the Frobenius norm of the residual correction dB (0 = fit the mean product only)",
        low=0.0,
    )
    similarity: str = option(
        "cosine",
        "S(dW, (B+dB)A) minimised: cosine (1 - cosine similarity, the paper's; iterative, see solver) or frobenius (squared error, closed-form ridge)",
        choices=("cosine", "frobenius"),
    )
    solver: str = option(
        "adam",
        "optimiser of the cosine correction: adam (step size relative to the RMS of the averaged B, best iterate kept) or sgd (plain gradient descent at step_lr, the paper's form)",
        choices=("adam", "sgd"),
    )
    steps: int = option(100, "optimiser steps of the cosine correction per module and round", low=1)
    step_lr: float = option(
        0.01,
        "step size of the cosine correction: relative to the RMS of the averaged B for adam, absolute for sgd",
        low=0.0,
        low_open=True,
    )


def ridge_correction(target: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_dB ||target - (b_bar + dB) a_bar||_F^2 + lam ||dB||_F^2`` (float64, closed form)."""
    residual = target - b_bar @ a_bar
    gram = a_bar @ a_bar.T
    reg = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    # dB reg = residual a_bar^T  ->  dB = residual a_bar^T reg^-1 (reg is symmetric); lstsq also covers lam = 0 with a rank-deficient A
    return torch.linalg.lstsq(reg, (residual @ a_bar.T).T).solution.T


def cosine_objective(
    target: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor, db: torch.Tensor, lam: float
) -> torch.Tensor:
    """``1 - cos(target, (b_bar + db) a_bar) + lam ||db||_F`` (flattened matrices)."""
    approx = (b_bar + db) @ a_bar
    cos = (target * approx).sum() / (target.norm() * approx.norm()).clamp_min(1e-300)
    return 1.0 - cos + lam * db.pow(2).sum().add(1e-300).sqrt()


def cosine_gradient(
    cross: torch.Tensor, gram: torch.Tensor, target_norm: float, x: torch.Tensor, db: torch.Tensor, lam: float
) -> tuple[float, torch.Tensor | None]:
    """(value, gradient in ``dB``) of :func:`cosine_objective` at ``X = B + dB``, from ``C = T A^T`` and ``G = A A^T``.

    ``<T, X A> = sum(X * C)``, ``||X A||^2 = sum((X^T X) * G)``; the gradient of ``1 - cos`` is
    ``-(C / (|T| n) - <X, C> X G / (|T| n^3))`` with ``n = ||X A||``, the penalty adds
    ``lam dB / ||dB||`` (0 at ``dB = 0``). The gradient is None where ``X A = 0``.
    """
    xg = x @ gram
    n = math.sqrt(max(float((x * xg).sum()), 0.0))
    inner = float((x * cross).sum())
    db_norm = float(db.norm())
    value = 1.0 - inner / max(n * target_norm, 1e-300) + lam * db_norm
    if n == 0.0:
        return value, None
    grad = -(cross / (target_norm * n) - (inner / (target_norm * n**3)) * xg)
    if db_norm > 0:
        grad = grad + (lam / db_norm) * db
    return value, grad


def sgd_cosine_correction(
    target: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor, lam: float, steps: int, lr: float
) -> torch.Tensor:
    """``dB`` after ``steps`` plain gradient-descent steps on :func:`cosine_objective` from 0 (the last iterate)."""
    db = torch.zeros_like(b_bar)
    target_norm = float(target.norm())
    if target_norm == 0.0 or float(a_bar.norm()) == 0.0:
        return db
    cross, gram = target @ a_bar.T, a_bar @ a_bar.T
    for _ in range(steps):
        _, grad = cosine_gradient(cross, gram, target_norm, b_bar + db, db, lam)
        if grad is None:
            break
        db = db - lr * grad
    return db


def cosine_correction(
    target: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor, lam: float, steps: int, step_lr: float
) -> torch.Tensor:
    """``dB`` minimising :func:`cosine_objective` by ``steps`` Adam steps from 0 (the best iterate is kept).

    Works on ``(out, r)`` and ``(r, r)`` matrices only (:func:`cosine_gradient`); Adam (betas
    0.9/0.999) is written out, so no autograd graph is built.
    """
    zero = torch.zeros_like(b_bar)
    target_norm = float(target.norm())
    if target_norm == 0.0 or float(a_bar.norm()) == 0.0:
        return zero
    cross, gram = target @ a_bar.T, a_bar @ a_bar.T
    scale = float(b_bar.pow(2).mean().sqrt()) or target_norm / (math.sqrt(target.numel()) * float(a_bar.norm()))
    lr, beta1, beta2, eps = step_lr * scale, 0.9, 0.999, 1e-30
    db, m, v = zero.clone(), zero.clone(), zero.clone()
    best, best_value = zero, float("inf")
    for step in range(1, steps + 2):
        value, grad = cosine_gradient(cross, gram, target_norm, b_bar + db, db, lam)
        if value < best_value:
            best, best_value = db.clone(), value
        if step > steps or grad is None:
            break
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        db = db - lr * m_hat / (v_hat.sqrt() + eps)
    return best


class FairAggregator(Aggregator):
    """Weighted mean of every delta (factors and plain tensors) plus the weighted mean of client products."""

    def __init__(self, global_state: AdapterState) -> None:
        self.products = ProductMeanAggregator(global_state, factors_are_deltas=True)
        names = [n for pair in self.products.pairs.values() for n in pair]
        self.factors = StreamingWeightedMean(restrict(global_state, names))

    def add(self, update: ClientUpdate) -> None:
        if update.num_examples <= 0:
            return
        self.products.add(update)  # checks shapes first; a rejected update leaves no trace
        self.factors.add(update, float(update.num_examples))

    @property
    def count(self) -> int:
        return self.products.count

    def result(self) -> AdapterState:
        out: OrderedDict[str, torch.Tensor] = OrderedDict(self.factors.result().tensors)
        out.update(self.products.plain_mean().tensors)
        return AdapterState(out)


@register_strategy("lora_fair", LoRAFairOptions)
class LoRAFair(FedAvg):
    """FedAvg of the LoRA factors, then B corrected so that ``B A`` approaches the mean client product."""

    opts: LoRAFairOptions
    streaming_mean = False  # also sums client products (float64), not only a weighted mean of the deltas

    def validate_run(self, run_cfg: RunConfig) -> None:
        super().validate_run(run_cfg)
        require_lora_method(self.name, run_cfg)
        refuse_secure_aggregation(self.name, run_cfg, "each client's product B_k A_k")

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        if not lora_pairs(global_state.tensors):
            raise ConfigError("strategy.name", "lora_fair needs a LoRA adapter (lora_A/lora_B factors); this adapter has none")
        return FairAggregator(global_state)

    def correction(self, target: torch.Tensor, b_bar: torch.Tensor, a_bar: torch.Tensor) -> torch.Tensor:
        """The residual ``dB`` for one module (float64 matrices)."""
        if self.opts.similarity == "frobenius":
            return ridge_correction(target, b_bar, a_bar, self.opts.lam)
        if self.opts.solver == "sgd":
            return sgd_cosine_correction(target, b_bar, a_bar, self.opts.lam, self.opts.steps, self.opts.step_lr)
        return cosine_correction(target, b_bar, a_bar, self.opts.lam, self.opts.steps, self.opts.step_lr)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        agg = unwrap(aggregator)
        if not isinstance(agg, FairAggregator):
            raise TypeError("lora_fair.finish_round needs the aggregator its begin_round returned")
        lr = self.server_lr
        averaged = apply_delta(global_state, agg.result(), lr)
        targets = step_products(global_state, agg.products.mean_products(), lr)
        before = after = total = 0.0
        out = averaged.clone()
        for module, (a_name, b_name) in agg.products.pairs.items():
            a_bar, b_bar = factor_matrices(averaged[a_name], averaged[b_name])
            target = targets[module]
            db = self.correction(target, b_bar, a_bar)
            new_b = b_bar + db
            before += float((target - b_bar @ a_bar).pow(2).sum())
            after += float((target - new_b @ a_bar).pow(2).sum())
            total += float(target.pow(2).sum())
            like = averaged[b_name]
            out.tensors[b_name] = new_b.reshape(like.shape).to(like.dtype)
        self.last_metrics["lora_fair_residual_before"] = math.sqrt(before / total) if total > 0 else 0.0
        self.last_metrics["lora_fair_residual_after"] = math.sqrt(after / total) if total > 0 else 0.0
        return out
