"""A whole secure-aggregation round in one process: every client and the coordinator, the
messages encoded as they travel (task hyperparameters as JSON, replies as adapter containers),
no network. For tests and for measuring the protocol's cost at many clients per round
(``benchmarks/privacy_secagg.py``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dpeft.codec import encode_state
from dpeft.privacy.secagg import crypto, messages
from dpeft.privacy.secagg.client import ClientRound
from dpeft.privacy.secagg.context import RoundContext, SecAggSettings
from dpeft.privacy.secagg.encoding import decode, encode, to_wire, vector_length
from dpeft.privacy.secagg.server import ServerRound
from dpeft.state import AdapterState


@dataclass
class RoundCost:
    """Bytes each client sent and received (protocol messages, the masked vector included, the
    global adapter excluded) and seconds spent, per client (mean) and by the coordinator."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    client_s: dict[int, float] = field(default_factory=dict)
    coordinator_s: float = 0.0
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # the coordinator's view of each masked input

    def add(self, c: int, up: int = 0, down: int = 0, seconds: float = 0.0) -> None:
        self.up[c] = self.up.get(c, 0) + up
        self.down[c] = self.down.get(c, 0) + down
        self.client_s[c] = self.client_s.get(c, 0.0) + seconds


def _hp_bytes(body: dict) -> int:
    return len(json.dumps({"secagg": body}, sort_keys=True))


def secure_sum(
    deltas: dict[int, AdapterState],
    weights: dict[int, int],
    settings: SecAggSettings,
    losses: dict[int, float] | None = None,
    drop_after_masking: set[int] = frozenset(),  # type: ignore[assignment]
    silent_in_unmask: set[int] = frozenset(),  # type: ignore[assignment]
    round_num: int = 1,
) -> tuple[AdapterState, int, float, RoundCost]:
    """(sum of w * delta, sum of w, sum of w * loss, cost) over the clients that did not drop;
    raises :class:`~dpeft.privacy.secagg.server.SecAggFailure` when too many dropped."""
    cost = RoundCost()
    t = time.perf_counter()
    clients = sorted(deltas)
    schema = deltas[clients[0]].schema()
    key = crypto.new_private_key()
    ctx = RoundContext.create(settings, "inprocess", round_num, os.urandom(16), clients, crypto.public_bytes(key))
    srv = ServerRound(ctx, key, vector_length(schema))
    cost.coordinator_s += time.perf_counter() - t
    parties: dict[int, ClientRound] = {}
    for c in clients:
        t = time.perf_counter()
        parties[c] = ClientRound(ctx, c)
        c_pk, s_pk = parties[c].advertise()
        up = len(encode_state(messages.reply({"c_pk": c_pk, "s_pk": s_pk})))
        cost.add(c, up, _hp_bytes(messages.request(ctx)), time.perf_counter() - t)
        t = time.perf_counter()
        srv.add_keys(c, c_pk, s_pk)
        cost.coordinator_s += time.perf_counter() - t
    t = time.perf_counter()
    peers = srv.peers_u1()
    cost.coordinator_s += time.perf_counter() - t
    for u, p in peers.items():
        body = messages.request(ctx, **messages.share_request(p))
        t = time.perf_counter()
        sealed = parties[u].share_keys(p)
        up = len(encode_state(messages.reply({f"to.{v}": s for v, s in sealed.items()})))
        cost.add(u, up, _hp_bytes(body), time.perf_counter() - t)
        t = time.perf_counter()
        srv.add_shares(u, sealed)
        cost.coordinator_s += time.perf_counter() - t
    for u, (alive, sealed) in srv.mask_requests().items():
        body = messages.request(ctx, **messages.mask_request(alive, sealed))
        t = time.perf_counter()
        loss = (losses or {}).get(u, 0.0)
        encoded = encode(deltas[u], min(weights[u], ctx.max_weight), loss, ctx.bits, ctx.scale, ctx.clip)
        y, tag = parties[u].mask(encoded, alive, sealed)
        up = len(encode_state(messages.reply({"masked": to_wire(y, ctx.bits), "tag": tag})))
        cost.add(u, up, _hp_bytes(body), time.perf_counter() - t)
        if u in drop_after_masking:
            continue
        cost.masked[u] = y
        t = time.perf_counter()
        srv.add_masked(u, y, tag)
        cost.coordinator_s += time.perf_counter() - t
    for u, (dropped, survived) in srv.unmask_requests().items():
        if u in silent_in_unmask:
            continue
        body = messages.request(ctx, **messages.unmask_request(dropped, survived))
        t = time.perf_counter()
        shares, tag = parties[u].unmask(dropped, survived)
        up = len(encode_state(messages.reply({**shares, "tag": tag})))
        cost.add(u, up, _hp_bytes(body), time.perf_counter() - t)
        t = time.perf_counter()
        srv.add_unmask(u, shares, tag)
        cost.coordinator_s += time.perf_counter() - t
    t = time.perf_counter()
    total = srv.result()
    summed, weight, loss_sum, _ = decode(total, schema, ctx.bits, ctx.scale, ctx.clip)
    cost.coordinator_s += time.perf_counter() - t
    return summed, weight, loss_sum, cost
