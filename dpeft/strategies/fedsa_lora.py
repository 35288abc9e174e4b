"""FedSA-LoRA (Guo et al. 2025): share the A factors, keep the B factors personal.

The A factors learn general knowledge and are averaged with the plain tensors; each
client's B factors stay on that client. The global B is never changed, so the global
adapter alone (e.g. a global evaluation) reflects only the shared part — personalised
models are the global with each client's own B.

Client convention: ``configure_train`` returns ``{"personal": ["lora_B", ...]}``, the LoRA
B path components present. A client keeps its own value of every parameter whose
structural name has one of them as a dot-separated component (starting from the global
value the first time it trains) and loads only the other tensors from the global it is
sent. Deltas for personal tensors are ignored (zero or absent are both fine).
"""

from __future__ import annotations

from typing import Any

from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.lora import factor_components, has_component
from dpeft.strategies.partial import PartialFedAvg


@register_strategy("fedsa_lora")
class FedSALoRA(PartialFedAvg):
    """Aggregate A factors and plain tensors; B factors are personal and the global B is unchanged."""

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        self.require_lora(global_state)
        _, b_parts = factor_components(global_state.tensors)
        return TaskHyperparams(personal=tuple(b_parts)).to_dict()

    def shared_names(self, global_state: AdapterState) -> list[str]:
        _, b_parts = factor_components(global_state.tensors)
        return [k for k in global_state.tensors if not has_component(k, b_parts)]
