"""Aggregating LoRA modules through their products ``B @ A`` and re-factoring by SVD.

:class:`ProductMeanAggregator` keeps, per LoRA module, the example-weighted sum of client
products ``B_i @ A_i`` — one ``(out, in)`` float64 matrix per module however many clients
report (memory O(1) in clients, O(out x in) per module) — and a streaming weighted mean of
the plain tensors' deltas. :func:`refactor_global` turns target products back into factors
of a chosen rank with :func:`~dpeft.strategies.lora.factorize`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from dpeft.errors import RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import StreamingWeightedMean, restrict
from dpeft.strategies.aggregator import Aggregator, ClientUpdate
from dpeft.strategies.lora import factorize, lora_pairs, product, relative_error, shaped_like


class ProductMeanAggregator(Aggregator):
    """Weighted mean of per-module client products, plus the weighted mean of plain deltas.

    ``factors_are_deltas=True``: an update's LoRA tensors are deltas against the global, so
    the client's factors are ``global + delta`` (same shapes as the global). ``False``: they
    are the client's full factors, of any rank ``r_c`` (``A`` ``(r_c, in)``, ``B`` ``(out, r_c)``).
    Plain tensors are always deltas.
    """

    def __init__(self, global_state: AdapterState, factors_are_deltas: bool) -> None:
        self.global_state = global_state
        self.pairs = lora_pairs(global_state.tensors)
        self.factors_are_deltas = factors_are_deltas
        factor_names = {n for pair in self.pairs.values() for n in pair}
        plain = [k for k in global_state.tensors if k not in factor_names]
        self.plain = StreamingWeightedMean(restrict(global_state, plain))
        self._sums: dict[str, torch.Tensor] = {}
        for module, (a_name, b_name) in self.pairs.items():
            a, b = global_state[a_name], global_state[b_name]
            self._sums[module] = torch.zeros(b.shape[0], a[0].numel(), dtype=torch.float64)
        self._weight = 0.0
        self._count = 0
        self.client_ranks: list[int] = []

    def _client_factors(self, update: ClientUpdate, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        g_a, g_b = self.global_state[a_name], self.global_state[b_name]
        try:
            a, b = update.delta[a_name], update.delta[b_name]
        except KeyError as e:
            raise RejectedUpdate("missing_tensor", f"client {update.client_id}: no {e.args[0]}") from None
        if self.factors_are_deltas:
            if a.shape != g_a.shape or b.shape != g_b.shape:
                raise RejectedUpdate("shape", f"client {update.client_id}: {a_name}/{b_name} do not match the global shapes")
            return g_a.to(torch.float64) + a.to(torch.float64), g_b.to(torch.float64) + b.to(torch.float64)
        rank_ok = a.dim() == g_a.dim() and b.dim() == g_b.dim() and a.shape[0] == b.shape[1] and a.shape[0] >= 1
        if not rank_ok or a.shape[1:] != g_a.shape[1:] or b.shape[0] != g_b.shape[0] or b.shape[2:] != g_b.shape[2:]:
            raise RejectedUpdate(
                "shape",
                f"client {update.client_id}: factors {tuple(a.shape)}/{tuple(b.shape)} do not fit global "
                f"{tuple(g_a.shape)}/{tuple(g_b.shape)} at any rank",
            )
        return a, b

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_examples)
        if w <= 0:
            return
        products = {}  # all checked before anything is folded, so a rejected update leaves no trace
        ranks = set()
        for module, (a_name, b_name) in self.pairs.items():
            a, b = self._client_factors(update, a_name, b_name)
            ranks.add(int(a.shape[0]))
            products[module] = product(a, b)
        for module, p in products.items():
            self._sums[module].add_(p, alpha=w)
        self.plain.add(update, w)
        self._weight += w
        self._count += 1
        self.client_ranks.append(max(ranks, default=0))

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def mean_products(self) -> dict[str, torch.Tensor]:
        """Module prefix -> ``sum_i w_i B_i A_i / sum_i w_i`` (float64)."""
        if self._count == 0:
            raise ValueError("no updates were aggregated")
        return {m: s / self._weight for m, s in self._sums.items()}

    def plain_mean(self) -> AdapterState:
        """Weighted mean delta of the plain (non-factor) tensors."""
        if self._count == 0:
            raise ValueError("no updates were aggregated")
        return self.plain.result()

    def result(self) -> AdapterState:
        """Diagnostic view: mean products keyed by module prefix, then the plain mean deltas."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict(self.mean_products())
        out.update(self.plain_mean().tensors)
        return AdapterState(out)


def global_products(state: AdapterState) -> dict[str, torch.Tensor]:
    """Module prefix -> ``B @ A`` of ``state`` (float64)."""
    return {m: product(state[a], state[b]) for m, (a, b) in lora_pairs(state.tensors).items()}


def refactor_global(
    global_state: AdapterState,
    targets: dict[str, torch.Tensor],
    ranks: dict[str, int],
    keeps: dict[str, int] | None = None,
    plain_delta: AdapterState | None = None,
    lr: float = 1.0,
) -> tuple[AdapterState, dict[str, float]]:
    """A new state: each LoRA module re-factored from ``targets[module]`` at ``ranks[module]``.

    ``keeps`` optionally truncates a module to fewer live components than its rank (see
    :func:`~dpeft.strategies.lora.factorize`). Plain tensors become ``global + lr *
    plain_delta`` (unchanged when ``plain_delta`` is None). Also returns
    ``truncation_error`` (relative Frobenius error over all modules together) and
    ``truncation_error_max`` (the worst module).
    """
    pairs = lora_pairs(global_state.tensors)
    factors: dict[str, torch.Tensor] = {}
    discarded_all = total_all = worst = 0.0
    for module, (a_name, b_name) in pairs.items():
        keep = None if keeps is None else keeps.get(module)
        b_mat, a_mat, discarded, total = factorize(targets[module], ranks[module], keep)
        a, b = shaped_like(a_mat, b_mat, global_state[a_name], global_state[b_name])
        factors[a_name], factors[b_name] = a, b
        discarded_all += discarded
        total_all += total
        worst = max(worst, relative_error(discarded, total))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, g in global_state.items():
        if k in factors:
            out[k] = factors[k]
        elif plain_delta is not None and k in plain_delta.tensors:
            out[k] = (g.to(torch.float64) + lr * plain_delta[k].to(torch.float64)).to(g.dtype)
        else:
            out[k] = g.clone()
    metrics = {"truncation_error": relative_error(discarded_all, total_all), "truncation_error_max": worst}
    return AdapterState(out, dict(global_state.meta)), metrics


def step_products(global_state: AdapterState, means: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """``P_global + lr * (P_mean - P_global)`` per module (exactly ``P_mean`` when ``lr == 1``)."""
    if lr == 1.0:
        return dict(means)
    current = global_products(global_state)
    return {m: current[m] + lr * (means[m] - current[m]) for m in means}
