"""Small builders shared by the strategy tests."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from dpeft.config import StrategyConfig
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, Strategy, make_strategy


def make(name: str, server_lr: float = 1.0, **options: Any) -> Strategy:
    """A registered strategy built from a StrategyConfig."""
    return make_strategy(StrategyConfig(name=name, server_lr=server_lr, options=options))


def state(**tensors: Any) -> AdapterState:
    """An AdapterState from keyword tensors (``__`` in a keyword becomes ``.``)."""
    return AdapterState(OrderedDict((k.replace("__", "."), torch.as_tensor(v, dtype=torch.float32)) for k, v in tensors.items()))


def named(pairs: list[tuple[str, Any]], dtype: torch.dtype = torch.float32) -> AdapterState:
    """An AdapterState from (name, tensor) pairs."""
    return AdapterState(OrderedDict((k, torch.as_tensor(v).to(dtype)) for k, v in pairs))


def upd(cid: int, delta: AdapterState, n: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id=cid, delta=delta, num_examples=n)


def run_round(strategy: Strategy, global_state: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
    """One full round: begin, add every update, finish."""
    agg = strategy.begin_round(global_state)
    for u in updates:
        agg.add(u)
    return strategy.finish_round(global_state, agg)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)


def lora_state(
    modules: dict[str, tuple[int, int, int]], plain: dict[str, tuple[int, ...]] | None = None, seed: int = 0, dtype=torch.float64
) -> AdapterState:
    """Random LoRA factors: module -> (out, in, r) gives ``<m>.lora_A.weight`` (r, in), ``<m>.lora_B.weight`` (out, r)."""
    g = torch.Generator().manual_seed(seed)
    items: list[tuple[str, torch.Tensor]] = []
    for m, (out, inp, r) in modules.items():
        items.append((f"{m}.lora_A.weight", torch.randn(r, inp, generator=g, dtype=dtype)))
        items.append((f"{m}.lora_B.weight", torch.randn(out, r, generator=g, dtype=dtype)))
    for k, shape in (plain or {}).items():
        items.append((k, torch.randn(*shape, generator=g, dtype=dtype)))
    return AdapterState(OrderedDict(items))


def random_like(template: AdapterState, seed: int, scale: float = 1.0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(OrderedDict((k, scale * torch.randn(v.shape, generator=g, dtype=v.dtype)) for k, v in template.items()))


def client_factors(g: AdapterState, rank: int, seed: int) -> AdapterState:
    """Random factors of rank ``rank`` for every LoRA module of ``g`` (other tensors keep their shape)."""
    gen = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in g.items():
        shape = (rank, *v.shape[1:]) if ".lora_A." in k else (v.shape[0], rank) if ".lora_B." in k else v.shape
        out[k] = torch.randn(shape, generator=gen, dtype=v.dtype)
    return AdapterState(out)
