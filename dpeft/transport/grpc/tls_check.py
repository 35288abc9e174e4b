"""TLS set up wrong on one side: say so at once, naming the flag, instead of retrying a connection that cannot work.

gRPC reports every failed connection as UNAVAILABLE, whether the coordinator is restarting (worth
retrying for the worker's patience) or the two ends can never agree. :func:`tls_problem` picks the
second kind out of the status details:

- the coordinator's certificate is not trusted (any other failed handshake of a TLS worker, e.g.
  ``CERTIFICATE_VERIFY_FAILED`` for a private CA without ``--ca``, or a signature by another CA);
- the coordinator does not speak TLS (``WRONG_VERSION_NUMBER`` on a ``--tls`` worker);
- the certificate does not name the host dialled (hostname verification: ``--server-name``);
- the coordinator wants a client certificate (mutual TLS: ``--cert``/``--key``);
- a plaintext worker dialling a TLS coordinator sees only "Socket closed": one TLS handshake is
  then tried on the side (:func:`speaks_tls`) to tell that apart from a coordinator going away.
"""

from __future__ import annotations

import socket
import ssl

from dpeft.errors import DpeftError


class TlsMismatch(DpeftError):
    """The worker's and the coordinator's TLS settings cannot work together (exit 2: fix the flags)."""

    exit_code = 2


def _reason(details: str) -> str:
    """OpenSSL's words in gRPC's details ('CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate')."""
    tail = details.rsplit("OPENSSL_internal:", 1)[-1] if "OPENSSL_internal:" in details else details
    return tail.removesuffix(": OK").strip()[:200]


def tls_problem(details: str, address: str, tls: bool) -> str | None:
    """A one-line explanation naming the flag to change, or None when the failure may be transient."""
    if "Hostname Verification" in details:
        return (
            f"TLS: the coordinator's certificate does not name the host in {address}; dial a name it lists, "
            "or pass --server-name with one of them"
        )
    handshake = "handshake failed" in details.lower() or "CERTIFICATE_VERIFY_FAILED" in details
    if not (tls and handshake):
        return None
    if "WRONG_VERSION_NUMBER" in details:
        return (
            f"TLS: the coordinator at {address} does not speak TLS (plaintext); drop --tls/--ca/--cert, "
            "or start the coordinator with --tls-cert and --tls-key"
        )
    if any(m in details for m in ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "certificate required")):
        return f"TLS: the coordinator at {address} requires a client certificate (mutual TLS); pass --cert and --key"
    return (
        f"TLS: the coordinator at {address} presented a certificate this worker does not trust ({_reason(details)}); "
        "pass --ca with the CA file that signed it (the ca.pem of `dpeft certs`)"
    )


def speaks_tls(address: str, timeout_s: float = 3.0) -> bool:
    """True when a TLS handshake with ``address`` (HOST:PORT) succeeds, certificates unchecked."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError as exc:  # a TLS server that refused this anonymous client still spoke TLS
        return "WRONG_VERSION_NUMBER" not in str(exc) and "record layer failure" not in str(exc).lower()
    except (OSError, ValueError):
        return False
