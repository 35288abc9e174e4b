"""TLS for the coordinator and workers, and `dpeft certs`: a self-signed test CA and certificates.

Server: certificate chain + private key (PEM); with a client CA, mutual TLS (workers must
present a certificate signed by it). Worker: the CA that signed the server certificate (or
the system roots), optionally its own certificate and key for mutual TLS.

The certificates :func:`make_test_certs` writes are for trying things out; for a real
deployment use certificates from your own CA or an ACME CA (see the documentation, "Deploy edge workers": docs/guides/edge.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import grpc

from dpeft.errors import ConfigError


def _read(path: str | os.PathLike[str] | None, key: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(key, f"{path} is not a PEM file")
    return data


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """Server TLS credentials, or None for plaintext (no cert and no key)."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("auth.tls_client_ca", "mutual TLS needs auth.tls_cert and auth.tls_key too")
        return None
    if not cert or not key:
        raise ConfigError("auth.tls_cert" if not cert else "auth.tls_key", "TLS needs both auth.tls_cert and auth.tls_key")
    cert_pem, key_pem = _read(cert, "auth.tls_cert"), _read(key, "auth.tls_key")
    ca_pem = _read(client_ca, "auth.tls_client_ca")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None)


def channel_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """Worker TLS credentials: trust ``ca`` (None = system roots), present cert/key for mutual TLS."""
    if bool(cert) != bool(key):
        raise ConfigError("--cert" if not cert else "--key", "a client certificate needs both --cert and --key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--ca"), private_key=_read(key, "--key"), certificate_chain=_read(cert, "--cert")
    )


def make_test_certs(out: str | os.PathLike[str], hosts: list[str] | None = None, client_names: list[str] | None = None, days: int = 365) -> list[Path]:
    """Write ca.pem/ca.key, server.pem/server.key (SAN: ``hosts``) and client certs; return the paths."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise ConfigError("certs", "needs the 'cryptography' package (or use the openssl recipe in the documentation's 'Deploy edge workers' guide)") from None

    hosts = hosts or ["localhost", "127.0.0.1"]
    client_names = client_names or ["client"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    written: list[Path] = []

    def key_pair() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(name: str, k: ec.EllipticCurvePrivateKey) -> None:
        path = out_dir / name
        data = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        written.append(path)

    def write_cert(name: str, c: x509.Certificate) -> None:
        path = out_dir / name
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        written.append(path)

    ca_key = key_pair()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpeft test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write_key("ca.key", ca_key)
    write_cert("ca.pem", ca_cert)

    def leaf(common_name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key_pair()
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert, k = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, names)
    write_key("server.key", k)
    write_cert("server.pem", cert)
    for name in client_names:
        cert, k = leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        stem = "client" if name == "client" else f"client-{name}"
        write_key(f"{stem}.key", k)
        write_cert(f"{stem}.pem", cert)
    return written
