"""Server optimizer state: named moment buffers, one tensor per adapter parameter.

Buffers live in groups (``"m"``, ``"v"``, ...) and are created lazily the first time a
parameter is stepped. ``state_dict()`` flattens them to ``"<group>/<param>"`` -> tensor for
checkpoints; ``load_state_dict`` restores exactly that. Buffers are kept in float64 so many
rounds of small updates do not drift; that costs 8 bytes per adapter element per group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch


class Moments:
    """Groups of per-parameter float64 buffers."""

    def __init__(self, groups: tuple[str, ...]) -> None:
        for g in groups:
            if not g or "/" in g:
                raise ValueError(f"bad moment group name {g!r}")
        self.groups = groups
        self._buffers: dict[str, OrderedDict[str, torch.Tensor]] = {g: OrderedDict() for g in groups}

    def get(self, group: str, name: str, like: torch.Tensor, init: float = 0.0) -> torch.Tensor:
        """The buffer ``group/name``, created filled with ``init`` (shaped like ``like``) when new."""
        buffers = self._buffers[group]
        buf = buffers.get(name)
        if buf is None:
            buf = torch.full(tuple(like.shape), float(init), dtype=torch.float64)
            buffers[name] = buf
        elif tuple(buf.shape) != tuple(like.shape):
            raise ValueError(f"moment {group}/{name} has shape {tuple(buf.shape)}, parameter {tuple(like.shape)}")
        return buf

    def set(self, group: str, name: str, value: torch.Tensor) -> None:
        """Replace the buffer ``group/name``."""
        self._buffers[group][name] = value.detach().to(torch.float64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<group>/<param>"`` -> a copy of the buffer."""
        return {f"{g}/{k}": v.clone() for g in self.groups for k, v in self._buffers[g].items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace all buffers with those in ``state`` (as ``state_dict`` wrote them)."""
        fresh: dict[str, OrderedDict[str, torch.Tensor]] = {g: OrderedDict() for g in self.groups}
        for key, value in state.items():
            group, sep, name = key.partition("/")
            if not sep or group not in fresh or not name:
                raise ValueError(f"unexpected optimizer state key {key!r}; groups are {', '.join(self.groups)}")
            fresh[group][name] = torch.as_tensor(value).detach().to(torch.float64).clone()
        self._buffers = fresh
