"""The public context of one secure-aggregation round, and the settings it is built from."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from dpeft.privacy.secagg import graph
from dpeft.privacy.secagg.encoding import scale_for


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: Any, size: int | None = None) -> bytes:
    if not isinstance(text, str) or len(text) > 1 << 16:
        raise ValueError("expected a base64 string")
    raw = base64.b64decode(text, validate=True)
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class SecAggSettings:
    """The ``privacy.secagg_*`` keys of a run."""

    neighbours: int | None
    threshold: float
    bits: int
    clip_range: float
    max_weight: int

    @classmethod
    def from_config(cls, cfg: Any) -> SecAggSettings:
        p = cfg.privacy
        return cls(p.secagg_neighbours, p.secagg_threshold, p.secagg_bits, p.secagg_clip_range, p.secagg_max_weight)


@dataclass(frozen=True)
class RoundContext:
    """Everything public about one round of the protocol; every message is bound to its digest."""

    run_id: str
    round: int
    nonce: str  # base64 of 16 random bytes drawn by the coordinator for this round
    clients: tuple[int, ...]  # the sampled clients, sorted
    degree: int  # neighbours asked (the graph may give one more)
    threshold: int
    bits: int
    scale: float
    clip: float
    max_weight: int
    server_pk: str  # base64 of the coordinator's X25519 public key of this round

    @classmethod
    def create(
        cls, settings: SecAggSettings, run_id: str, round_num: int, nonce: bytes, clients: list[int], server_pk: bytes
    ) -> RoundContext:
        n = len(clients)
        asked = settings.neighbours if settings.neighbours is not None else graph.default_degree(n)
        degree = graph.graph_degree(n, min(asked, n - 1))
        return cls(
            run_id,
            round_num,
            b64(nonce),
            tuple(sorted(clients)),
            degree,
            graph.threshold(degree, settings.threshold),
            settings.bits,
            scale_for(settings.bits, n, settings.max_weight, settings.clip_range),
            settings.clip_range,
            settings.max_weight,
            b64(server_pk),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clients"] = list(self.clients)
        return d

    @classmethod
    def from_json(cls, d: Any) -> RoundContext:
        if not isinstance(d, dict) or set(d) != {f for f in cls.__dataclass_fields__}:
            raise ValueError("malformed secure-aggregation context")
        clients = d["clients"]
        if not isinstance(clients, list) or not all(isinstance(c, int) for c in clients) or len(clients) > 1 << 16:
            raise ValueError("malformed client list")
        return cls(
            str(d["run_id"]),
            int(d["round"]),
            str(d["nonce"]),
            tuple(sorted(clients)),
            int(d["degree"]),
            int(d["threshold"]),
            int(d["bits"]),
            float(d["scale"]),
            float(d["clip"]),
            int(d["max_weight"]),
            str(d["server_pk"]),
        )

    def digest(self) -> bytes:
        """32 bytes binding keys, shares and uploads to this run, round and nonce."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).digest()

    def graph(self) -> dict[int, list[int]]:
        return graph.neighbours(list(self.clients), self.degree, self.digest())

    @property
    def tolerated(self) -> int:
        """Dropouts after masking the round survives when they fall anywhere (each client needs
        ``threshold`` of its ``degree`` neighbours to answer the unmasking)."""
        return max(0, self.degree - self.threshold)
