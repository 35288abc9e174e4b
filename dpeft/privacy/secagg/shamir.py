"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

A secret (a self-mask seed or an X25519 private key, 256 bits) is the constant term of a
random polynomial of degree ``threshold - 1``; the share of the client with id ``c`` is the
polynomial at ``x = c + 1`` (never 0). Any ``threshold`` shares give the secret back by
Lagrange interpolation at 0; fewer reveal nothing about it. Coefficients come from
:func:`secrets.randbelow`.
"""

from __future__ import annotations

import secrets

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # 521 bits


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, nonzero), any ``threshold`` of which recover it."""
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} with {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def combine(shares: dict[int, bytes], size: int = 32) -> bytes:
    """The secret of ``size`` bytes from shares {point: share} (exactly the threshold or more)."""
    pts = [(x % PRIME, int.from_bytes(y, "big")) for x, y in shares.items()]
    total = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    if total >= 1 << (8 * size):
        raise ValueError("shares do not combine to a secret of the expected size")
    return total.to_bytes(size, "big")
