"""A client's side of one SecAgg+ round (Bell et al. 2020), independent of any transport.

The four steps, each answering one coordinator message:

1. :meth:`ClientRound.advertise` -- fresh X25519 key pairs ``c`` (share encryption) and ``s``
   (pairwise masks), and a random self-mask seed ``b``; the public keys go to the coordinator.
2. :meth:`ClientRound.share_keys` -- given its neighbours' public keys, Shamir-shares ``s``'s
   private key and ``b`` among them (threshold ``t``), each neighbour's pair of shares sealed
   with AES-GCM under a key agreed with that neighbour (the coordinator routes them unread).
3. :meth:`ClientRound.mask` -- decrypts the shares its neighbours sent it, then adds to its
   encoded update the self mask ``PRG(b)`` and, per neighbour ``v`` still in the round,
   ``+PRG(s_uv)`` if ``u < v`` else ``-PRG(s_uv)`` (mod ``2**bits``); the result and an HMAC
   binding it to the round context and the client go to the coordinator.
4. :meth:`ClientRound.unmask` -- for each neighbour the coordinator says dropped, the share of
   its mask key; for each one that survived, the share of its self-mask seed; never both for
   one neighbour, and only once. Then the round's secrets are forgotten.

Secrets exist only in this object's memory; nothing here logs or writes them.
"""

from __future__ import annotations

import struct

import numpy as np

from dpeft.privacy.secagg import crypto, shamir
from dpeft.privacy.secagg.context import RoundContext, unb64
from dpeft.privacy.secagg.encoding import modulus


class SecAggError(Exception):
    """A protocol message that cannot be honoured (malformed, inconsistent, or a second request)."""


def pair_mask(key: bytes, count: int, bits: int, own: int, other: int) -> np.ndarray:
    """The pairwise mask ``own`` adds for the pair (``own``, ``other``): +PRG or its negation."""
    m = crypto.prg(key, count, bits)
    if own < other:
        return m
    return (np.uint64(0) - m) & np.uint64(modulus(bits) - 1) if bits < 64 else np.uint64(0) - m


class ClientRound:
    """One client's secrets and progress through one round."""

    def __init__(self, ctx: RoundContext, client_id: int) -> None:
        if client_id not in ctx.clients:
            raise SecAggError(f"client {client_id} is not in round {ctx.round}'s context")
        self.ctx = ctx
        self.id = client_id
        self.digest = ctx.digest()
        self.graph_peers = set(ctx.graph()[client_id])
        self._c = crypto.new_private_key()
        self._s = crypto.new_private_key()
        self._b = crypto.random_seed()
        self._mac = crypto.derive(self._c, unb64(ctx.server_pk, crypto.KEY_BYTES), "mac", self.digest, client_id, -1)
        self.peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (c_pk, s_pk), after step 2
        self.held: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (share of its s key, share of its b)
        self.masked_with: set[int] = set()
        self.step = 1

    def advertise(self) -> tuple[bytes, bytes]:
        """(c public key, s public key)."""
        return crypto.public_bytes(self._c), crypto.public_bytes(self._s)

    def _aad(self, sender: int, recipient: int) -> bytes:
        return self.digest + struct.pack("<qq", sender, recipient)

    def share_keys(self, peers: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Sealed shares for each neighbour in ``peers`` (neighbour -> (c_pk, s_pk))."""
        if self.step != 1:
            raise SecAggError("keys were already shared this round")
        if not set(peers) <= self.graph_peers:
            raise SecAggError("the coordinator named peers that are not this client's neighbours in the round's graph")
        if len(peers) < self.ctx.threshold:
            raise SecAggError(f"{len(peers)} neighbours cannot hold shares with threshold {self.ctx.threshold}")
        own = self.advertise()
        if any(pk in own for pair in peers.values() for pk in pair):
            raise SecAggError("a neighbour advertised this client's own public key")
        self.peers = dict(peers)
        xs = [v + 1 for v in sorted(peers)]
        s_shares = shamir.split(crypto.private_bytes(self._s), self.ctx.threshold, xs)
        b_shares = shamir.split(self._b, self.ctx.threshold, xs)
        out = {}
        for v in sorted(peers):
            key = crypto.derive(self._c, peers[v][0], "enc", self.digest, self.id, v)
            out[v] = crypto.seal(key, s_shares[v + 1] + b_shares[v + 1], self._aad(self.id, v))
        self.step = 2
        return out

    def mask(self, encoded: np.ndarray, alive: list[int], sealed: dict[int, bytes]) -> tuple[np.ndarray, bytes]:
        """(masked vector, its tag): ``encoded`` (residues mod 2**bits) masked for the neighbours
        ``alive`` (those that shared keys), whose sealed shares for this client are ``sealed``."""
        if self.step != 2:
            raise SecAggError("not expecting a masking request now")
        if not set(alive) <= set(self.peers) or set(sealed) != set(alive):
            raise SecAggError("the masking request names neighbours this client did not share keys with")
        for v in alive:
            key = crypto.derive(self._c, self.peers[v][0], "enc", self.digest, self.id, v)
            try:
                plain = crypto.open_sealed(key, sealed[v], self._aad(v, self.id))
            except Exception:  # noqa: BLE001 - cryptography's InvalidTag: forged, altered or misrouted
                raise SecAggError(f"the shares from client {v} do not authenticate") from None
            size = shamir.SHARE_BYTES
            if len(plain) != 2 * size:
                raise SecAggError(f"the shares from client {v} have the wrong size")
            self.held[v] = (plain[:size], plain[size:])
        bits = self.ctx.bits
        count = len(encoded)
        mask = np.uint64(modulus(bits) - 1) if bits < 64 else None
        with np.errstate(over="ignore"):
            y = encoded.astype(np.uint64) + crypto.prg(self._b, count, bits)
            for v in alive:
                key = crypto.derive(self._s, self.peers[v][1], "mask", self.digest, self.id, v)
                y = y + pair_mask(key, count, bits, self.id, v)
        if mask is not None:
            y &= mask
        self.masked_with = set(alive)
        self.step = 3
        return y, crypto.tag(self._mac, "masked", self.digest, self.id, y.astype("<u8").tobytes())

    def unmask(self, dropped: list[int], survived: list[int]) -> tuple[dict[str, bytes], bytes]:
        """Shares released for unmasking: ``s.<v>`` (mask-key share of a dropped neighbour),
        ``b.<v>`` (self-mask share of a surviving one), and the reply's tag. Once per round."""
        if self.step != 3:
            raise SecAggError("not expecting an unmasking request now")
        d, s = set(dropped), set(survived)
        if d & s or self.id in d or not (d | s) <= set(self.held) or (d | s) != self.masked_with:
            raise SecAggError("inconsistent unmasking request (a neighbour both dropped and surviving, or unknown)")
        out = {f"s.{v}": self.held[v][0] for v in sorted(d)}
        out.update({f"b.{v}": self.held[v][1] for v in sorted(s)})
        reply_tag = crypto.tag(self._mac, "unmask", self.digest, self.id, unmask_payload(out))
        self.forget()
        return out, reply_tag

    def forget(self) -> None:
        """Drop every secret of the round (keys, seed, held shares)."""
        self._c = self._s = None  # type: ignore[assignment]
        self._b = b""
        self.held.clear()
        self.step = 4


def unmask_payload(shares: dict[str, bytes]) -> bytes:
    """The bytes an unmasking reply's tag covers (names and shares, sorted)."""
    return b"".join(k.encode() + b"=" + shares[k] for k in sorted(shares))
