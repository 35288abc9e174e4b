"""Secure aggregation, the protocol alone (no model, no network): what the coordinator sees of
each masked update is independent of it, the unmasked sum is exact to the quantisation step,
dropouts after masking are recovered up to the tolerated count and one more fails with nothing
released, and replayed or tampered uploads are refused."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from dpeft.privacy.secagg import crypto, encoding, shamir
from dpeft.privacy.secagg.client import ClientRound, SecAggError
from dpeft.privacy.secagg.context import RoundContext, SecAggSettings
from dpeft.privacy.secagg.graph import neighbours
from dpeft.privacy.secagg.inprocess import secure_sum
from dpeft.privacy.secagg.server import SecAggFailure, ServerRound
from dpeft.state import AdapterState

SETTINGS = SecAggSettings(neighbours=None, threshold=0.5, bits=32, clip_range=1.0, max_weight=1000)


def _deltas(n: int, size: int = 4000, seed: int = 0) -> tuple[dict[int, AdapterState], dict[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    deltas = {
        c: AdapterState(OrderedDict(a=torch.randn(size - 7, generator=gen) * 0.01, b=torch.randn(7, generator=gen) * 0.01))
        for c in range(n)
    }
    return deltas, {c: 10 + 3 * c for c in range(n)}


def _plain(deltas: dict[int, AdapterState], weights: dict[int, int], keep: list[int]) -> dict[str, torch.Tensor]:
    return {k: sum(weights[c] * deltas[c][k].double() for c in keep) for k in deltas[keep[0]].tensors}  # type: ignore[misc]


def test_shamir_threshold() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [2, 5, 7, 9])
    assert shamir.combine({x: shares[x] for x in (2, 7, 9)}) == secret
    assert shamir.combine({x: shares[x] for x in (5, 9)} | {2: shares[2]}) == secret
    try:  # two shares of a threshold-3 secret: a random field element, almost never 256 bits long
        assert shamir.combine({x: shares[x] for x in (2, 5)}) != secret
    except ValueError:
        pass


def test_graph_is_regular_and_public() -> None:
    g = neighbours(list(range(50)), 10, b"seed")
    assert all(len(v) == 10 and c not in v for c, v in g.items())
    assert all(c in g[v] for c, vs in g.items() for v in vs)  # symmetric
    assert g == neighbours(list(range(50)), 10, b"seed") and g != neighbours(list(range(50)), 10, b"other")


def test_sum_exact_to_quantisation_step_and_masked_views_uncorrelated() -> None:
    n = 8
    deltas, weights = _deltas(n)
    losses = {c: 0.5 + 0.1 * c for c in range(n)}
    summed, weight, loss_sum, cost = secure_sum(deltas, weights, SETTINGS, losses)
    assert weight == sum(weights.values())
    assert loss_sum == pytest.approx(sum(weights[c] * losses[c] for c in range(n)), abs=n * 1e-3)
    scale = encoding.scale_for(32, n, SETTINGS.max_weight, 1.0)
    plain = _plain(deltas, weights, list(range(n)))
    for k, v in plain.items():
        err = (summed[k].double() - v).abs().max().item()
        assert err <= n * 0.5 / scale + 1e-6 * v.abs().max().item()  # half a step per client (+ fp32 rounding)
    # the coordinator's view of each upload: uniform residues, uncorrelated with the update
    for c in range(n):
        y = cost.masked[c].astype(np.float64)
        x = deltas[c]["a"].double().numpy()
        corr = np.corrcoef(y[: x.size], x)[0, 1]
        assert abs(corr) < 4 / np.sqrt(x.size)  # ~0 (4 sigma of the null)
        assert abs(y.mean() / 2**32 - 0.5) < 0.02  # spread over the whole ring


def test_dropouts_after_masking_recovered_up_to_tolerance_then_fail() -> None:
    n = 6
    deltas, weights = _deltas(n, size=500, seed=1)
    key = crypto.new_private_key()
    ctx = RoundContext.create(SETTINGS, "t", 1, b"\0" * 16, list(range(n)), crypto.public_bytes(key))
    tolerated = ctx.tolerated
    assert tolerated >= 1
    dropped = set(range(tolerated))
    summed, weight, _, _ = secure_sum(deltas, weights, SETTINGS, drop_after_masking=dropped)
    keep = [c for c in range(n) if c not in dropped]
    assert weight == sum(weights[c] for c in keep)
    plain = _plain(deltas, weights, keep)
    assert all(torch.allclose(summed[k].double(), v, atol=1e-3) for k, v in plain.items())
    with pytest.raises(SecAggFailure, match="shares needed"):
        secure_sum(deltas, weights, SETTINGS, drop_after_masking=set(range(tolerated + 1)))
    # clients that stay silent in the unmasking step count against the same shares
    with pytest.raises(SecAggFailure):
        secure_sum(deltas, weights, SETTINGS, drop_after_masking=set(range(tolerated)), silent_in_unmask={n - 1})


def _round(
    n: int = 4, round_num: int = 1
) -> tuple[ServerRound, dict[int, ClientRound], dict[int, tuple[list[int], dict[int, bytes]]]]:
    key = crypto.new_private_key()
    ctx = RoundContext.create(SETTINGS, "t", round_num, os.urandom(16), list(range(n)), crypto.public_bytes(key))
    srv = ServerRound(ctx, key, 12)
    parties = {c: ClientRound(ctx, c) for c in range(n)}
    for c, p in parties.items():
        srv.add_keys(c, *p.advertise())
    for u, peers in srv.peers_u1().items():
        srv.add_shares(u, parties[u].share_keys(peers))
    return srv, parties, srv.mask_requests()


def test_replayed_or_tampered_masked_update_refused() -> None:
    old, old_parties, old_req = _round(round_num=1)
    y_old, tag_old = old_parties[0].mask(np.arange(12, dtype=np.uint64), *old_req[0])
    srv, parties, req = _round(round_num=2)
    # a replay of round 1's upload in round 2
    with pytest.raises(SecAggError, match="does not authenticate"):
        srv.add_masked(0, y_old, tag_old)
    y, tag = parties[0].mask(np.arange(12, dtype=np.uint64), *req[0])
    tampered = y.copy()
    tampered[3] ^= np.uint64(1)
    with pytest.raises(SecAggError, match="does not authenticate"):
        srv.add_masked(0, tampered, tag)
    with pytest.raises(SecAggError, match="does not authenticate"):
        srv.add_masked(1, y, tag)  # client 0's upload presented as client 1's
    srv.add_masked(0, y, tag)
    with pytest.raises(SecAggError, match="unexpected"):
        srv.add_masked(0, y, tag)  # once per round


def test_client_refuses_inconsistent_requests() -> None:
    srv, parties, req = _round()
    alive, sealed = req[1]
    forged = dict(sealed)
    v = next(iter(forged))
    forged[v] = forged[v][:-1] + bytes([forged[v][-1] ^ 1])
    with pytest.raises(SecAggError, match="authenticate"):
        parties[1].mask(np.zeros(12, dtype=np.uint64), alive, forged)  # a share altered on the way
    parties[2].mask(np.zeros(12, dtype=np.uint64), *req[2])
    others = [v for v in req[2][0]]
    with pytest.raises(SecAggError, match="inconsistent"):
        parties[2].unmask(others[:1], others)  # both dropped and surviving: would reveal both secrets
