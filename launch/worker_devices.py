"""Which device each local worker process of `dpeft simulate` trains on, and how it must start.

``simulate.devices`` (cycled over the processes) or, when empty, ``train.device`` for all of
them; a bare ``cuda`` or ``auto`` puts process i on visible GPU ``i mod count``, so N workers
spread round-robin over the GPUs (several may share one). CUDA cannot be used in a child
forked from a process that already touched it, and the coordinator loads its model before it
forks: workers that train on CUDA are spawned (``simulate.start: auto``), and ``fork`` with a
CUDA device is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from dpeft.config import RunConfig
from dpeft.errors import ConfigError


def worker_device_specs(cfg: RunConfig, count: int) -> list[tuple[str, str]]:
    """(device spelling, config key it comes from) of each of ``count`` worker processes."""
    devices = [str(d) for d in cfg.simulate.devices]
    if not devices:
        return [(cfg.train.device, "train.device")] * count
    return [(devices[i % len(devices)], f"simulate.devices[{i % len(devices)}]") for i in range(count)]


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def trains_on_cuda(specs: list[tuple[str, str]], cuda_visible: Callable[[], bool] = _cuda_visible) -> str | None:
    """The key of the first spelling that trains on CUDA (``auto`` does when a GPU is visible), else None.

    ``cuda_visible`` is asked only for ``auto``: a config that names cpu everywhere never touches CUDA."""
    for spec, key in specs:
        if spec == "cuda" or spec.startswith("cuda:"):
            return key
    if any(spec == "auto" for spec, _ in specs) and cuda_visible():
        return next(key for spec, key in specs if spec == "auto")
    return None


def choose_start_method(
    start: str, specs: list[tuple[str, str]], platform: str = sys.platform, cuda_visible: Callable[[], bool] = _cuda_visible
) -> str:
    """``simulate.start`` resolved to fork or spawn for workers training on ``specs``.

    auto: fork on Linux when no worker trains on CUDA, else spawn. fork with CUDA: ConfigError."""
    if start == "spawn":
        return "spawn"
    if start == "fork":
        key = trains_on_cuda(specs, cuda_visible)
        if key is not None:
            raise ConfigError(
                "simulate.start",
                f"fork cannot train on CUDA ({key} picks a GPU; a forked child cannot use CUDA): use spawn or auto",
            )
        return "fork"
    if not platform.startswith("linux"):
        return "spawn"
    return "spawn" if trains_on_cuda(specs, cuda_visible) is not None else "fork"


def rank_backend(specs: list[tuple[str, str]]) -> str:
    """The process-group backend of local all-reduce ranks: nccl when every rank has a GPU of its own, else gloo.

    (nccl needs one distinct GPU per rank; ranks on the CPU or sharing a GPU all-reduce with gloo.)"""
    from dpeft.train.device import resolve_device

    if any(spec == "cpu" for spec, _ in specs) or trains_on_cuda(specs) is None:
        return "gloo"
    used = [resolve_device(spec, local_index=i, key=key) for i, (spec, key) in enumerate(specs)]
    return "nccl" if all(d.type == "cuda" for d in used) and len(set(used)) == len(used) else "gloo"


def check_worker_devices(specs: list[tuple[str, str]]) -> None:
    """Resolve every worker's device here, before anything starts: a missing GPU is a ConfigError naming its key.

    Only spellings that may name a GPU are resolved; with ``cuda``/``auto`` this queries CUDA,
    which is harmless because such workers are spawned."""
    from dpeft.train.device import resolve_device

    for i, (spec, key) in enumerate(specs):
        if spec != "cpu":
            resolve_device(spec, local_index=i, key=key)
