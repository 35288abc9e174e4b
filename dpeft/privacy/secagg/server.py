"""The coordinator's side of one SecAgg+ round, independent of any transport.

It only ever holds public keys, sealed shares it cannot open, masked vectors, and -- after the
masked inputs are in -- the shares survivors release: mask-key shares of clients that dropped
after masking and self-mask shares of those that survived (never both for one client). From
those it removes the masks and releases the sum of the survivors' encoded updates, or raises
:class:`SecAggFailure` and releases nothing.

Sets of clients as in the paper: ``U1`` advertised keys, ``U2`` shared keys (they are masked
against each other), ``U3`` sent a valid masked input (the survivors), ``U4`` answered the
unmasking. A client that misses step 1 or 2 is simply left out; one in ``U2`` that misses step
3 is a dropout whose pairwise masks are removed through its neighbours' shares.
"""

from __future__ import annotations

import numpy as np

from dpeft.privacy.secagg import crypto, shamir
from dpeft.privacy.secagg.client import SecAggError, pair_mask, unmask_payload
from dpeft.privacy.secagg.context import RoundContext
from dpeft.privacy.secagg.encoding import modulus


class SecAggFailure(Exception):
    """The round's sum cannot be recovered (too many dropouts); nothing is released."""


class ServerRound:
    """The coordinator's bookkeeping of one round."""

    def __init__(self, ctx: RoundContext, server_key: crypto.X25519PrivateKey, length: int) -> None:
        self.ctx = ctx
        self.digest = ctx.digest()
        self.graph = ctx.graph()
        self.length = length  # entries of each masked vector
        self._key = server_key
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # U1: client -> (c_pk, s_pk)
        self._mac: dict[int, bytes] = {}
        self.sealed: dict[int, dict[int, bytes]] = {}  # U2: sender -> recipient -> sealed shares
        self.masked: dict[int, np.ndarray] = {}  # U3
        self.released: dict[int, dict[str, bytes]] = {}  # U4

    # -- step 1 -------------------------------------------------------------------
    def add_keys(self, client: int, c_pk: bytes, s_pk: bytes) -> None:
        if client not in self.graph or client in self.keys:
            raise SecAggError(f"unexpected keys from client {client}")
        crypto.public_from_bytes(c_pk), crypto.public_from_bytes(s_pk)
        if any(c_pk in pair or s_pk in pair for pair in self.keys.values()) or c_pk == s_pk:
            raise SecAggError(f"client {client} advertised a key already in use")
        self.keys[client] = (c_pk, s_pk)
        self._mac[client] = crypto.derive(self._key, c_pk, "mac", self.digest, client, -1)

    def peers_u1(self) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Step 2 requests: each client of U1 with at least ``threshold`` neighbours in U1 -> those neighbours' keys.
        Clients left with fewer are left out (and dropped from U1), until every remaining one has enough."""
        while True:
            short = [u for u in self.keys if sum(v in self.keys for v in self.graph[u]) < self.ctx.threshold]
            if not short:
                break
            for u in short:
                del self.keys[u]
        return {u: {v: self.keys[v] for v in self.graph[u] if v in self.keys} for u in sorted(self.keys)}

    # -- step 2 -------------------------------------------------------------------
    def add_shares(self, client: int, sealed: dict[int, bytes]) -> None:
        want = {v for v in self.graph.get(client, []) if v in self.keys}
        if client not in self.keys or client in self.sealed or set(sealed) != want:
            raise SecAggError(f"unexpected shares from client {client}")
        self.sealed[client] = dict(sealed)

    def mask_requests(self) -> dict[int, tuple[list[int], dict[int, bytes]]]:
        """Step 3 requests: client of U2 -> (its neighbours in U2, the sealed shares they sent it)."""
        out = {}
        for u in sorted(self.sealed):
            alive = [v for v in self.graph[u] if v in self.sealed]
            out[u] = (alive, {v: self.sealed[v][u] for v in alive})
        return out

    # -- step 3 -------------------------------------------------------------------
    def add_masked(self, client: int, vector: np.ndarray, tag: bytes) -> None:
        """A masked input; refused (:class:`SecAggError`) unless its tag binds it to this round and client."""
        if client not in self.sealed or client in self.masked:
            raise SecAggError(f"unexpected masked input from client {client}")
        if vector.shape != (self.length,):
            raise SecAggError(f"masked input of client {client} has {vector.size} entries, expected {self.length}")
        payload = vector.astype("<u8").tobytes()
        if not crypto.tag_ok(self._mac[client], "masked", self.digest, client, payload, tag):
            raise SecAggError(f"masked input of client {client} does not authenticate (tampered, or replayed from another round)")
        self.masked[client] = vector.astype(np.uint64)

    def unmask_requests(self) -> dict[int, tuple[list[int], list[int]]]:
        """Step 4 requests: survivor -> (its neighbours that dropped after masking, those that survived)."""
        out = {}
        for u in sorted(self.masked):
            alive = [v for v in self.graph[u] if v in self.sealed]
            out[u] = ([v for v in alive if v not in self.masked], [v for v in alive if v in self.masked])
        return out

    # -- step 4 -------------------------------------------------------------------
    def add_unmask(self, client: int, shares: dict[str, bytes], tag: bytes) -> None:
        if client not in self.masked or client in self.released:
            raise SecAggError(f"unexpected unmasking reply from client {client}")
        dropped, survived = self.unmask_requests()[client]
        want = {f"s.{v}" for v in dropped} | {f"b.{v}" for v in survived}
        if set(shares) != want or any(len(s) != shamir.SHARE_BYTES for s in shares.values()):
            raise SecAggError(f"unmasking reply of client {client} does not answer the request")
        if not crypto.tag_ok(self._mac[client], "unmask", self.digest, client, unmask_payload(shares), tag):
            raise SecAggError(f"unmasking reply of client {client} does not authenticate")
        self.released[client] = dict(shares)

    def _secret(self, kind: str, v: int) -> bytes:
        got = {u + 1: r[f"{kind}.{v}"] for u, r in self.released.items() if f"{kind}.{v}" in r}
        if len(got) < self.ctx.threshold:
            raise SecAggFailure(
                f"round {self.ctx.round}: only {len(got)} of the {self.ctx.threshold} shares needed to unmask client {v} arrived"
            )
        picked = dict(sorted(got.items())[: self.ctx.threshold])
        try:
            return shamir.combine(picked)
        except ValueError:
            raise SecAggFailure(f"round {self.ctx.round}: the shares of client {v} do not combine") from None

    def result(self) -> np.ndarray:
        """The sum of the survivors' encoded updates (residues mod 2**bits), or :class:`SecAggFailure`."""
        if len(self.masked) < 2:
            raise SecAggFailure(f"round {self.ctx.round}: {len(self.masked)} masked input(s); at least 2 are needed")
        bits = self.ctx.bits
        secrets_b = {u: self._secret("b", u) for u in self.masked}
        dropped = [v for v in self.sealed if v not in self.masked]
        secrets_s = {}
        for v in dropped:
            raw = self._secret("s", v)
            key = crypto.private_from_bytes(raw)
            if crypto.public_bytes(key) != self.keys[v][1]:
                raise SecAggFailure(f"round {self.ctx.round}: the recovered mask key of client {v} does not match its public key")
            secrets_s[v] = key
        with np.errstate(over="ignore"):
            total = np.zeros(self.length, dtype=np.uint64)
            for u, y in self.masked.items():
                total = total + y - crypto.prg(secrets_b[u], self.length, bits)
            for v, key in secrets_s.items():
                for u in self.graph[v]:
                    if u in self.masked:  # u added its mask for the pair (u, v); v's never arrived
                        k = crypto.derive(key, self.keys[u][1], "mask", self.digest, v, u)
                        total = total - pair_mask(k, self.length, bits, u, v)
        if bits < 64:
            total &= np.uint64(modulus(bits) - 1)
        return total
