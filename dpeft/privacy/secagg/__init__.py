"""Secure aggregation (SecAgg+, Bell et al. 2020): the coordinator learns only the sum of the
surviving clients' weighted, quantised updates.

Pieces: :mod:`~dpeft.privacy.secagg.encoding` (fixed point modulo ``2**bits``),
:mod:`~dpeft.privacy.secagg.graph` (the sparse masking graph, threshold),
:mod:`~dpeft.privacy.secagg.crypto` (X25519, HKDF, ChaCha20 masks, AES-GCM, HMAC),
:mod:`~dpeft.privacy.secagg.shamir` (secret sharing), :mod:`~dpeft.privacy.secagg.client` and
:mod:`~dpeft.privacy.secagg.server` (the two sides of a round, transport-free),
:mod:`~dpeft.privacy.secagg.messages` (the task kinds and their payloads),
:mod:`~dpeft.privacy.secagg.checks` (config checks). The coordinator's round driver is
``dpeft_coordinator.secagg``, the worker's ``dpeft_workers.secagg``. User documentation:
``docs/secure-aggregation.md``.
"""
