"""A dpeft plug-in that lives outside the package (tests put this directory on PYTHONPATH).

It registers one implementation of every family: a strategy, a sync policy, a codec, a dataset
loader and a local loss. The loss and the loader leave a marker file per process in
``marker_dir`` when given, so a test can see which processes ran them.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dpeft
from dpeft.strategies.fedavg import FedAvg, FedAvgOptions
from dpeft.sync.synchronous import Synchronous


def _mark(marker_dir: str, what: str) -> None:
    if marker_dir:
        Path(marker_dir, f"{what}-{os.getpid()}").touch()


@dataclass(kw_only=True)
class CappedOptions(FedAvgOptions):
    max_step_norm: float = dpeft.option(10.0, "largest global L2 norm of one server step", low=0.0, low_open=True)


@dpeft.register_strategy("demo_capped", CappedOptions)
class Capped(FedAvg):
    """FedAvg whose server step is scaled down to at most ``max_step_norm``."""

    opts: CappedOptions

    def aggregated_delta(self, aggregator: Any) -> dpeft.AdapterState:
        delta = super().aggregated_delta(aggregator)
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for _, t in delta.items())))
        scale = min(1.0, self.opts.max_step_norm / norm) if norm > 0 else 1.0
        self.last_metrics["demo_step_norm"] = norm
        return dpeft.AdapterState(OrderedDict((k, t * scale) for k, t in delta.items()), dict(delta.meta))


@dpeft.register_policy("demo_sync")
class DemoSync(Synchronous):
    """Synchronous rounds under another name."""


@dataclass(kw_only=True)
class HalfOptions:
    demo_clamp: float = dpeft.option(1e4, "clamp values to +-this before the cast", low=0.0, low_open=True)


@dpeft.register_codec("demo_half", options=HalfOptions)
class DemoHalf(dpeft.UpdateCodec):
    """fp16 on the wire, clamped."""

    name = "demo_half"

    def __init__(self, opts: HalfOptions) -> None:
        self.clamp = opts.demo_clamp

    def params(self) -> dict[str, Any]:
        return {"clamp": self.clamp}

    def layout(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> OrderedDict[str, Any]:
        from dpeft.codec.updates.base import Part

        return OrderedDict([(name, Part(shape, torch.float16, True))])

    def encode_tensor(self, name: str, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([(name, x.float().clamp(-self.clamp, self.clamp).to(torch.float16))])

    def decode_tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, parts: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return parts[name].to(dtype)


@dataclass(kw_only=True)
class ToyOptions:
    size: int = dpeft.option(64, "examples to generate", low=4)
    marker_dir: str = dpeft.option("", "directory for per-process marker files ('' = none)")


WORDS = {"good": ["great", "lovely", "fine", "superb"], "bad": ["awful", "dull", "poor", "bland"]}


@dpeft.register_dataset("demo_toy", options=ToyOptions)
def toy(cfg: dpeft.DataConfig, opts: ToyOptions) -> dpeft.TextDataset:
    _mark(opts.marker_dir, "dataset")
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(opts.size):
        label = i % 2
        words = WORDS["good" if label else "bad"]
        texts.append(f"the film was {rng.choice(words)} and {rng.choice(words)}")
        labels.append(label)
    return dpeft.TextDataset(texts, labels, ["bad", "good"])


@dataclass(kw_only=True)
class SmoothOptions:
    eps: float = dpeft.option(0.1, "label smoothing in [0, 1)", low=0.0, high=1.0, high_open=True)
    marker_dir: str = dpeft.option("", "directory for per-process marker files ('' = none)")


@dpeft.register_loss("demo_smooth", options=SmoothOptions)
def smooth(model: torch.nn.Module, batch: dict[str, torch.Tensor], ctx: dpeft.LossContext) -> torch.Tensor:
    _mark(ctx.options.marker_dir, "loss")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], label_smoothing=ctx.options.eps)
