"""FLoRA (Wang et al. 2024): aggregate LoRA modules by stacking, then re-factor to the global rank.

Clients train the global factors and send deltas; a client's factors are ``A_i = A + dA_i``
and ``B_i = B + dB_i``. FLoRA stacks them along the rank axis with the (normalised)
example weights ``w_i``::

    B_stack = [w_1 B_1, ..., w_n B_n]      A_stack = [A_1; ...; A_n]
    B_stack @ A_stack = sum_i w_i B_i A_i                      (exactly)

so the stacked adapter *is* the weighted mean of the client products — noise-free, unlike
averaging A and B separately. Here the global keeps a fixed rank ``r``, so the stack (rank
``n r``) is truncated to ``r``. The best rank-``r`` truncation of ``B_stack @ A_stack``
(Eckart-Young) is the SVD of the product sum, so we never build the stack: the aggregator
folds ``w_i B_i A_i`` into one ``(out, in)`` matrix per module as updates arrive (memory
O(1) in clients), then ``P = U S V^T`` gives ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.

With ``server_lr != 1`` the target product is ``P_global + server_lr * (P_mean - P_global)``.
Plain tensors are FedAvg'd. ``last_metrics["flora_truncation_error"]`` is the relative
Frobenius error of the truncation over all modules (``..._max``: the worst module).
Option ``rank`` (default: each module's global rank) truncates further while keeping the
global's shapes; the dropped slots restart like a fresh peft init (A live, B zero).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpeft.config import RunConfig, StrategyConfig
from dpeft.config.options import option
from dpeft.errors import ConfigError
from dpeft.state import AdapterState
from dpeft.strategies.base import Aggregator, option_key, register_strategy, unwrap
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.strategies.lora import lora_pairs, require_lora_method
from dpeft.strategies.lora_products import ProductMeanAggregator, refactor_global, step_products


@dataclass(kw_only=True)
class FLoRAOptions(FedAvgOptions):
    """Options of flora."""

    rank: int | None = option(None, "live rank after truncation, at most the global LoRA rank (null = the global rank)", low=1)


@register_strategy("flora", FLoRAOptions)
class FLoRA(FedAvg):
    """Stacking aggregation of LoRA products, SVD-truncated back to the global rank."""

    opts: FLoRAOptions
    streaming_mean = False  # sums of LoRA products (float64), not a StreamingWeightedMean of the deltas

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.rank = self.opts.rank

    def validate_run(self, run_cfg: RunConfig) -> None:
        super().validate_run(run_cfg)
        require_lora_method(self.name, run_cfg)
        if self.rank is not None and self.rank > run_cfg.adapter.r:
            raise ConfigError(option_key("rank"), f"{self.rank} exceeds the global LoRA rank adapter.r={run_cfg.adapter.r}")

    def make_aggregator(self, global_state: AdapterState) -> Aggregator:
        pairs = lora_pairs(global_state.tensors)
        if not pairs:
            raise ConfigError("strategy.name", "flora needs a LoRA adapter (lora_A/lora_B factors); this adapter has none")
        if self.rank is not None:
            for module, (a_name, _) in pairs.items():
                if self.rank > global_state[a_name].shape[0]:
                    raise ConfigError(
                        option_key("rank"),
                        f"{self.rank} exceeds the global LoRA rank {global_state[a_name].shape[0]} of {module}",
                    )
        return ProductMeanAggregator(global_state, factors_are_deltas=True)

    def finish_round(self, global_state: AdapterState, aggregator: Aggregator) -> AdapterState:
        agg = unwrap(aggregator)
        if not isinstance(agg, ProductMeanAggregator):
            raise TypeError("flora.finish_round needs the aggregator its begin_round returned")
        lr = self.server_lr
        targets = step_products(global_state, agg.mean_products(), lr)
        ranks = {m: global_state[a].shape[0] for m, (a, _) in agg.pairs.items()}
        keeps = None if self.rank is None else {m: self.rank for m in ranks}
        new, metrics = refactor_global(global_state, targets, ranks, keeps, agg.plain_mean(), lr)
        self.last_metrics["flora_truncation_error"] = metrics["truncation_error"]
        self.last_metrics["flora_truncation_error_max"] = metrics["truncation_error_max"]
        return new
