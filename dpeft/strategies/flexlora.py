"""FlexLoRA (Bai et al. 2024): heterogeneous-rank LoRA aggregation through products and SVD.

Clients may train LoRA modules of different ranks ``r_c``. The server averages what every
rank shares, the full-size products ``B_c @ A_c`` (example-weighted, folded as updates
arrive: one ``(out, in)`` matrix per module, O(1) in clients), and re-factors the mean by
SVD to the global rank: ``P = U S V^T``, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.

Update convention — different from every other strategy: a factor of rank ``r_c`` cannot
be a delta against a global factor of another shape, so **for LoRA factor tensors the
update holds the client's full local factors** (``A`` of shape ``(r_c, in)``, ``B`` of
shape ``(out, r_c)``); plain tensors are deltas as usual. ``configure_train`` returns
``{"full_factors": ["lora_A", "lora_B", ...]}``: the client sends its local value (not
local minus start) for every parameter whose structural name has one of those as a
dot-separated component. The update's schema therefore differs from the global's when
``r_c`` differs; the aggregator checks that the factors fit the global at some rank.

Client ranks: option ``client_ranks`` (a list, cycled by client id; default: everyone at
the global rank). The round engine must send each client ``client_state(global, id)``,
which is ``redistribute(global, r_c)`` — the global product re-factored to rank ``r_c``
— and the client builds its LoRA modules at the rank of the factors it receives.

Option ``rank`` (default: the global's current rank) is the rank the global keeps, the
largest any client uses; if it differs from the initial global's rank, the global changes
shape after the first round. ``last_metrics["flexlora_truncation_error"]`` reports the
relative Frobenius truncation error. ``clip_norm`` is rejected: full factors are not deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpeft.config import RunConfig, StrategyConfig
from dpeft.config.options import option
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.base import Aggregator, option_key, register_strategy, unwrap
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.lora import factor_components, lora_pairs, require_lora_method
from dpeft.strategies.lora_products import ProductMeanAggregator, global_products, refactor_global, step_products


def redistribute(global_state: AdapterState, rank: int) -> AdapterState:
    """``global_state`` with every LoRA module re-factored to ``rank`` by SVD of its product.

    Plain tensors are copied. Slots beyond the product's numerical rank start like a fresh
    peft init (A a unit singular direction at init scale, B zero), so they can still train.
    """
    pairs = lora_pairs(global_state.tensors)
    new, _ = refactor_global(global_state, global_products(global_state), {m: rank for m in pairs})
    return new


@dataclass(kw_only=True)
class FlexLoRAOptions(FedAvgOptions):
    """Options of flexlora."""

    rank: int | None = option(None, "LoRA rank the global keeps, the largest any client uses (null = the global's rank, adapter.r)", low=1)
    client_ranks: list[int] | None = option(
        None, "list of client LoRA ranks, client i uses client_ranks[i % len] (null = all at the global rank)", low=1
    )


@register_strategy("flexlora", FlexLoRAOptions)
class FlexLoRA(FedAvg):
    """Weighted mean of client LoRA products of any rank, SVD-truncated to the global rank."""

    streaming_mean = False  # sums of LoRA products (float64), not a StreamingWeightedMean of the deltas
    opts: FlexLoRAOptions

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        if self.clip_norm is not None:
            raise ConfigError(
                option_key("clip_norm"), "flexlora updates carry full LoRA factors, not deltas; clipping is not supported"
            )
        self.rank = self.opts.rank
        self.client_ranks = self.opts.client_ranks
        if self.rank is not None and self.client_ranks and max(self.client_ranks) > self.rank:
            raise ConfigError(option_key("client_ranks"), f"{max(self.client_ranks)} exceeds the global rank {self.rank}")

    @staticmethod
    def _pairs(global_state: AdapterState) -> dict[str, tuple[str, str]]:
        pairs = lora_pairs(global_state.tensors)
        if not pairs:
            raise ConfigError("strategy.name", "flexlora needs a LoRA adapter (lora_A/lora_B factors); this adapter has none")
        return pairs

    def global_rank(self, global_state: AdapterState) -> dict[str, int]:
        """Module -> the rank the next global has."""
        pairs = self._pairs(global_state)
        return {m: self.rank if self.rank is not None else global_state[a].shape[0] for m, (a, _) in pairs.items()}

    def client_rank(self, client_id: int) -> int | None:
        """The LoRA rank of ``client_id`` (None: the global's rank)."""
        if not self.client_ranks:
            return None
        return self.client_ranks[client_id % len(self.client_ranks)]

    def client_key(self, client_id: int) -> int | None:
        return self.client_rank(client_id)

    def validate_run(self, run_cfg: RunConfig) -> None:
        super().validate_run(run_cfg)
        require_lora_method(self.name, run_cfg)
        if self.rank is not None and self.rank != run_cfg.adapter.r:
            raise ConfigError(option_key("rank"), f"the global keeps adapter.r={run_cfg.adapter.r}; set adapter.r={self.rank} instead")
        if self.client_ranks and max(self.client_ranks) > run_cfg.adapter.r:
            raise ConfigError(
                option_key("client_ranks"),
                f"{max(self.client_ranks)} exceeds the global rank adapter.r={run_cfg.adapter.r} (set adapter.r to the largest client rank)",
            )

    def client_state(self, global_state: AdapterState, client_id: int) -> AdapterState:
        rank = self.client_rank(client_id)
        if rank is None:
            return global_state
        pairs = self._pairs(global_state)
        if all(global_state[a].shape[0] == rank for a, _ in pairs.values()):
            return global_state
        return redistribute(global_state, rank)

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        self._pairs(global_state)
        a_parts, b_parts = factor_components(global_state.tensors)
        return TaskHyperparams(full_factors=tuple(a_parts + b_parts)).to_dict()

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        self._pairs(global_state)
        return ProductMeanAggregator(global_state, factors_are_deltas=False)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        agg = unwrap(aggregator)
        if not isinstance(agg, ProductMeanAggregator):
            raise TypeError("flexlora.finish_round needs the aggregator its begin_round returned")
        lr = self.server_lr
        targets = step_products(global_state, agg.mean_products(), lr)
        new, metrics = refactor_global(global_state, targets, self.global_rank(global_state), None, agg.plain_mean(), lr)
        self.last_metrics["flexlora_truncation_error"] = metrics["truncation_error"]
        self.last_metrics["flexlora_truncation_error_max"] = metrics["truncation_error_max"]
        return new
