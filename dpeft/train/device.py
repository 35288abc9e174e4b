"""Which device a process computes on: ``auto | cpu | cuda | cuda:N | mps``.

``auto`` picks a GPU when one is visible (CUDA first, then Apple's MPS), else the CPU. A bare
``cuda`` means the process's own GPU: ``local_index`` when the launcher gave it one (a torchrun
``LOCAL_RANK``, a simulate worker's slot), else the current CUDA device (a Ray actor sees only
the GPU Ray assigned it, as device 0).
"""

from __future__ import annotations

import re

import torch

from dpeft.errors import ConfigError

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def check_device_spec(key: str, spec: str) -> None:
    """ConfigError(key) unless ``spec`` is a device spelling this module understands."""
    m = _SPEC.match(spec)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(key, f"expected auto, cpu, cuda, cuda:N or mps, got {spec!r}")


def resolve_device(spec: str, local_index: int | None = None, key: str = "train.device") -> torch.device:
    """The ``torch.device`` for a config spelling; a device that is not there is a ConfigError naming ``key``."""
    check_device_spec(key, spec)
    kind, _, index = spec.partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(key, "mps was asked for but is not available on this machine")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(key, f"{spec} was asked for but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver); use cpu or auto")
    count = torch.cuda.device_count()
    if index:
        n = int(index)
    elif local_index is not None:
        n = local_index % count
    else:
        n = torch.cuda.current_device()
    if n >= count:
        raise ConfigError(key, f"{spec}: only {count} CUDA device(s) visible")
    return torch.device("cuda", n)
