"""Cryptographic primitives of secure aggregation, all from the ``cryptography`` package.

- **Key agreement**: X25519 key pairs, fresh for every client and round; a shared secret is
  stretched with HKDF-SHA256 whose ``info`` binds it to its purpose and to the round context
  (run id, round number, the round's random nonce) and to the unordered client pair.
- **Mask expansion (PRG)**: ChaCha20 keyed with a 32-byte seed (a pairwise key or a client's
  self-mask seed), 16-byte all-zero nonce/counter block, encrypting zeros: the key stream,
  read as little-endian unsigned words, reduced modulo ``2**bits``. Every seed is used for one
  round only, so the fixed nonce never repeats under a key.
- **Share encryption**: AES-256-GCM with a pairwise key derived from the clients' encryption key
  pair, a random 12-byte nonce and the (context, sender, recipient) as associated data, so a
  share routed through the coordinator can be neither read nor altered nor redirected by it.
- **Upload authentication**: HMAC-SHA256 with a key the client agrees with the coordinator's
  ephemeral X25519 key of the round; binds each masked upload (and each unmasking reply) to
  (run, round, nonce, client) and to the bytes sent, so a replay from another round or a
  tampered upload is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 32


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of an X25519 private key (what is secret-shared)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_from_bytes(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def derive(secret: X25519PrivateKey, peer_public: bytes, purpose: str, context: bytes, a: int, b: int) -> bytes:
    """A 32-byte key from an X25519 agreement, bound to ``purpose``, the round ``context`` and the
    unordered pair (``a``, ``b``); both ends of the pair derive the same key."""
    shared = secret.exchange(public_from_bytes(peer_public))
    lo, hi = min(a, b), max(a, b)
    info = b"dpeft-secagg/" + purpose.encode() + b"/" + context + struct.pack("<qq", lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def random_seed() -> bytes:
    return os.urandom(KEY_BYTES)


def prg(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` pseudo-random words modulo ``2**bits`` (uint64) expanded from ``seed`` with ChaCha20."""
    width = 4 if bits <= 32 else 8
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = enc.update(bytes(count * width))
    words = np.frombuffer(stream, dtype=np.uint32 if width == 4 else np.uint64).astype(np.uint64)
    if bits not in (32, 64):
        words &= np.uint64((1 << bits) - 1)
    return words


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output; raises ``cryptography.exceptions.InvalidTag`` when
    the ciphertext, the key or the associated data differ."""
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)


def tag(key: bytes, label: str, context: bytes, client_id: int, payload: bytes) -> bytes:
    """HMAC-SHA256 over (label, context, client id, SHA-256 of ``payload``)."""
    msg = label.encode() + b"/" + context + struct.pack("<q", client_id) + hashlib.sha256(payload).digest()
    return hmac.new(key, msg, hashlib.sha256).digest()


def tag_ok(key: bytes, label: str, context: bytes, client_id: int, payload: bytes, got: bytes) -> bool:
    return hmac.compare_digest(tag(key, label, context, client_id, payload), got)
