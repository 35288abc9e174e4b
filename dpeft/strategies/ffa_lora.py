"""FFA-LoRA (Sun et al. 2024): federated LoRA with the A factors frozen.

Every client keeps ``A`` at the global value (peft's random init, never changed), trains
only ``B`` and the plain tensors, and the server averages those. With a common ``A`` the
average is exact: ``mean_i(B_i) @ A == mean_i(B_i @ A)``, unlike averaging both factors.

Client convention: ``configure_train`` returns ``{"freeze": ["lora_A", ...]}``, the LoRA A
path components present in the adapter; the client sets ``requires_grad = False`` on every
parameter whose structural name has one of them as a dot-separated component. Deltas for
those tensors are ignored (zero or absent are both fine).
"""

from __future__ import annotations

from typing import Any

from dpeft.state import AdapterState
from dpeft.strategies.base import register_strategy
from dpeft.strategies.hyperparams import TaskHyperparams
from dpeft.strategies.lora import factor_components, has_component
from dpeft.strategies.partial import PartialFedAvg


@register_strategy("ffa_lora")
class FFALoRA(PartialFedAvg):
    """Aggregate B factors and plain tensors; A factors stay at their global value."""

    def configure_train(self, round_num: int, global_state: AdapterState) -> dict[str, Any]:
        self.require_lora(global_state)
        a_parts, _ = factor_components(global_state.tensors)
        return TaskHyperparams(freeze=tuple(a_parts)).to_dict()

    def shared_names(self, global_state: AdapterState) -> list[str]:
        a_parts, _ = factor_components(global_state.tensors)
        return [k for k in global_state.tensors if not has_component(k, a_parts)]
