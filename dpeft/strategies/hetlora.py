"""HetLoRA (Cho et al., EMNLP 2024): heterogeneous client LoRA ranks, zero-padded and sparsity-weighted.

The global keeps LoRA rank ``r_max = adapter.r``. Client ``k`` trains rank ``r_k`` (option
``client_ranks``, cycled by client id, as for flexlora) and is sent the global **truncated**
to its rank: ``A[:r_k]`` and ``B[:, :r_k]``. It returns its full local factors (``full_factors``,
as flexlora). The server zero-pads them to ``r_max`` and averages each module with the
sparsity weights of the paper::

    s_k = ||B_k A_k||_F          A = sum_k s_k pad(A_k) / sum_k s_k      (likewise B)

so clients whose update carries more energy count more. ``weighting`` says where ``s_k`` is
measured: ``norm`` per module (each module its own weights), ``client_norm`` once per client
over its whole adapter (``s_k = sqrt(sum_modules ||B_k A_k||_F^2)``, one weight for all its
modules), ``examples`` the example counts instead (the plain zero-padding average). Plain
tensors are FedAvg'd by examples. With ``server_lr`` = η the new factors are ``F + η (F_avg - F)``.

Rank self-pruning (:mod:`dpeft.strategies.rank_prune`): every task carries
``rank_prune = [prune_lambda, prune_keep, prune_threshold, min_rank(, rule)]``; the client
penalises its tail ranks (``r_k - floor(prune_keep r_k)`` of them) with
``prune_lambda * sum ||B_tail A_tail||_F`` and, when the tail has faded after training
(``prune_rule``: ``share``, its share of the adapter norm is below ``prune_threshold``;
``decrease``, its norm is smaller than in the factors the client received), zeroes the tail
and reports the rank it keeps (metric ``hetlora_rank``). The server remembers each client's reduced rank (checkpointed
with the strategy state) and sends it factors of that rank from then on; ranks never grow
back. ``last_metrics``: ``hetlora_rank_mean`` (over the round's clients, after pruning) and
``hetlora_pruned`` (clients that pruned this round).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dpeft.config import RunConfig, StrategyConfig
from dpeft.config.options import option
from dpeft.errors import ConfigError, RejectedUpdate
from dpeft.state import AdapterState
from dpeft.strategies.aggregate import StreamingWeightedMean, restrict
from dpeft.strategies.base import Aggregator, ClientUpdate, option_key, register_strategy, unwrap
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.lora import factor_components, factor_matrices, lora_pairs, refuse_secure_aggregation, require_lora_method
from dpeft.strategies.rank_prune import RankPrune


@dataclass(kw_only=True)
class HetLoRAOptions(FedAvgOptions):
    """Options of hetlora."""

    client_ranks: list[int] | None = option(
        None, "list of initial client LoRA ranks, client i starts at client_ranks[i % len] (null = all at adapter.r)", low=1
    )
    weighting: str = option(
        "norm",
        "aggregation weights: norm (sparsity weights, the Frobenius norm of B_k A_k, per module), client_norm (that norm over the client's whole adapter, one weight per client) or examples (plain zero-padding average)",
        choices=("norm", "client_norm", "examples"),
    )
    prune_lambda: float = option(
        0.01,
        "weight lambda of the tail-rank penalty (lambda times the summed Frobenius norms of B_tail A_tail) in the local loss (0 = none)",
        low=0.0,
    )
    prune_keep: float = option(
        0.75,
        "fraction gamma of a client's rank kept when its tail is pruned (tail = the last r - floor(gamma r) ranks)",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    )
    prune_threshold: float = option(
        0.05,
        "prune_rule share: prune the tail when the norm of B_tail A_tail over the norm of B A falls below this after local training (0 = never prune)",
        low=0.0,
        high=1.0,
    )
    min_rank: int = option(1, "self-pruning never takes a client below this rank", low=1)
    prune_rule: str = option(
        "share",
        "when a client prunes its tail: share (the tail's share of the adapter norm is below prune_threshold) or decrease (the tail's norm fell during local training, the paper's comparison; prune_threshold unused)",
        choices=("share", "decrease"),
    )


class PaddedMeanAggregator(Aggregator):
    """Per module, weighted sums of the clients' zero-padded factors; plain deltas by examples."""

    def __init__(self, global_state: AdapterState, weighting: str) -> None:
        self.global_state = global_state
        self.pairs = lora_pairs(global_state.tensors)
        self.weighting = weighting
        factor_names = {n for pair in self.pairs.values() for n in pair}
        self.plain = StreamingWeightedMean(restrict(global_state, [k for k in global_state.tensors if k not in factor_names]))
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        self._weight: dict[str, float] = {}
        for module, (a_name, b_name) in self.pairs.items():
            a, b = factor_matrices(global_state[a_name], global_state[b_name])
            self._a[module], self._b[module] = torch.zeros_like(a), torch.zeros_like(b)
            self._weight[module] = 0.0
        self._uniform_a = {m: t.clone() for m, t in self._a.items()}  # fallback when every product is zero
        self._uniform_b = {m: t.clone() for m, t in self._b.items()}
        self._count = 0
        self.reported: dict[int, int] = {}  # client id -> the rank it keeps (after self-pruning)

    def _factors(self, update: ClientUpdate, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        g_a, g_b = self.global_state[a_name], self.global_state[b_name]
        try:
            a, b = update.delta[a_name], update.delta[b_name]
        except KeyError as e:
            raise RejectedUpdate("missing_tensor", f"client {update.client_id}: no {e.args[0]}") from None
        ok = a.dim() == g_a.dim() and b.dim() == g_b.dim() and 1 <= a.shape[0] <= g_a.shape[0] and a.shape[0] == b.shape[1]
        if not ok or a.shape[1:] != g_a.shape[1:] or b.shape[0] != g_b.shape[0] or b.shape[2:] != g_b.shape[2:]:
            raise RejectedUpdate(
                "shape",
                f"client {update.client_id}: factors {tuple(a.shape)}/{tuple(b.shape)} do not fit global {tuple(g_a.shape)}/{tuple(g_b.shape)}",
            )
        return factor_matrices(a, b)

    def add(self, update: ClientUpdate) -> None:
        if update.num_examples <= 0:
            return
        factors = {m: self._factors(update, a, b) for m, (a, b) in self.pairs.items()}  # all checked before folding
        weights = self._weights(update, factors)
        rank = 0
        for module, (a, b) in factors.items():
            r = a.shape[0]
            rank = max(rank, r)
            w = weights[module]
            self._a[module][:r] += w * a
            self._b[module][:, :r] += w * b
            self._uniform_a[module][:r] += a
            self._uniform_b[module][:, :r] += b
            self._weight[module] += w
        self.plain.add(update, float(update.num_examples))
        self._count += 1
        reported = update.metrics.get("hetlora_rank")
        self.reported[update.client_id] = min(rank, int(reported)) if reported else rank

    def _weights(self, update: ClientUpdate, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Module -> this client's aggregation weight (see ``weighting``)."""
        if self.weighting == "examples":
            return dict.fromkeys(factors, float(update.num_examples))
        norms = {m: float(torch.linalg.matrix_norm(b @ a)) for m, (a, b) in factors.items()}
        if self.weighting == "client_norm":
            return dict.fromkeys(factors, sum(n * n for n in norms.values()) ** 0.5)
        return norms

    @property
    def count(self) -> int:
        return self._count

    def mean_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> the weighted mean of the padded ``(A, B)`` (float64 matrices at the global rank)."""
        if self._count == 0:
            raise ValueError("no updates were aggregated")
        out = {}
        for m in self.pairs:
            z = self._weight[m]
            if z > 0:
                out[m] = (self._a[m] / z, self._b[m] / z)
            else:
                out[m] = (self._uniform_a[m] / self._count, self._uniform_b[m] / self._count)
        return out

    def result(self) -> AdapterState:
        """Diagnostic view: the mean padded factors (``<module>.A``/``.B``), then the plain mean deltas."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for m, (a, b) in self.mean_factors().items():
            out[f"{m}.A"], out[f"{m}.B"] = a, b
        out.update(self.plain.result().tensors)
        return AdapterState(out)


def truncate(global_state: AdapterState, rank: int) -> AdapterState:
    """``global_state`` with every LoRA module cut to its first ``rank`` ranks (plain tensors shared)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(global_state.tensors)
    for a_name, b_name in lora_pairs(global_state.tensors).values():
        out[a_name] = global_state[a_name][:rank].clone()
        out[b_name] = global_state[b_name][:, :rank].clone()
    return AdapterState(out, dict(global_state.meta))


@register_strategy("hetlora", HetLoRAOptions)
class HetLoRA(FedAvg):
    """Zero-padded, sparsity-weighted mean of heterogeneous-rank client factors; truncated per client; self-pruning ranks."""

    opts: HetLoRAOptions
    streaming_mean = False  # norm-weighted sums of padded factors, not a StreamingWeightedMean of the deltas

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        if self.clip_norm is not None:
            raise ConfigError(
                option_key("clip_norm"), "hetlora updates carry full LoRA factors, not deltas; clipping is not supported"
            )
        self.client_ranks = self.opts.client_ranks
        self.ranks: dict[int, int] = {}  # client id -> rank after self-pruning (only clients that reported)
        self.prune = RankPrune(
            self.opts.prune_lambda, self.opts.prune_keep, self.opts.prune_threshold, self.opts.min_rank, self.opts.prune_rule
        )

    def validate_run(self, run_cfg: RunConfig) -> None:
        super().validate_run(run_cfg)
        require_lora_method(self.name, run_cfg)
        refuse_secure_aggregation(self.name, run_cfg, "the norm of each client's own update (its weight)")
        if self.client_ranks and max(self.client_ranks) > run_cfg.adapter.r:
            raise ConfigError(
                option_key("client_ranks"),
                f"{max(self.client_ranks)} exceeds the global rank adapter.r={run_cfg.adapter.r} (set adapter.r to the largest client rank)",
            )
        if self.opts.min_rank > run_cfg.adapter.r:
            raise ConfigError(
                option_key("min_rank"), f"{self.opts.min_rank} exceeds the global rank adapter.r={run_cfg.adapter.r}"
            )

    @staticmethod
    def _pairs(global_state: AdapterState) -> dict[str, tuple[str, str]]:
        pairs = lora_pairs(global_state.tensors)
        if not pairs:
            raise ConfigError("strategy.name", "hetlora needs a LoRA adapter (lora_A/lora_B factors); this adapter has none")
        return pairs

    def client_rank(self, client_id: int) -> int | None:
        """The rank ``client_id`` trains next (None: the global's rank)."""
        if client_id in self.ranks:
            return self.ranks[client_id]
        if not self.client_ranks:
            return None
        return self.client_ranks[client_id % len(self.client_ranks)]

    def client_key(self, client_id: int) -> int | None:
        return self.client_rank(client_id)

    def client_state(self, global_state: AdapterState, client_id: int) -> AdapterState:
        rank = self.client_rank(client_id)
        pairs = self._pairs(global_state)
        if rank is None or all(global_state[a].shape[0] <= rank for a, _ in pairs.values()):
            return global_state
        return truncate(global_state, rank)

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        self._pairs(global_state)
        a_parts, b_parts = factor_components(global_state.tensors)
        p = self.prune
        prune = p.to_wire() if p.lam > 0 or p.threshold > 0 or p.rule == "decrease" else None
        return TaskHyperparams(full_factors=tuple(a_parts + b_parts), rank_prune=prune).to_dict()

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        self._pairs(global_state)
        return PaddedMeanAggregator(global_state, self.opts.weighting)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        agg = unwrap(aggregator)
        if not isinstance(agg, PaddedMeanAggregator):
            raise TypeError("hetlora.finish_round needs the aggregator its begin_round returned")
        lr = self.server_lr
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        means = agg.mean_factors()
        plain = agg.plain.result()
        factor_of = {n: (m, i) for m, pair in agg.pairs.items() for i, n in enumerate(pair)}
        for name, g in global_state.items():
            if name in factor_of:
                module, i = factor_of[name]
                mean = means[module][i].reshape(g.shape)
                out[name] = (g.to(torch.float64) + lr * (mean - g.to(torch.float64))).to(g.dtype)
            elif name in plain.tensors:
                out[name] = (g.to(torch.float64) + lr * plain[name].to(torch.float64)).to(g.dtype)
            else:
                out[name] = g.clone()
        pruned = 0
        global_rank = max(global_state[a].shape[0] for a, _ in agg.pairs.values())
        for client, rank in agg.reported.items():
            if rank < (self.client_rank(client) or global_rank):
                pruned += 1
                self.ranks[client] = rank
        self.last_metrics["hetlora_pruned"] = float(pruned)
        self.last_metrics["hetlora_rank_mean"] = sum(agg.reported.values()) / len(agg.reported)
        return AdapterState(out, dict(global_state.meta))

    def state_dict(self) -> dict[str, torch.Tensor]:
        rows = sorted(self.ranks.items())
        return {"hetlora_client_ranks": torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        table = state.get("hetlora_client_ranks")
        if table is not None:
            self.ranks = {int(c): int(r) for c, r in table.tolist()}
