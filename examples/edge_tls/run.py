"""A coordinator and an edge worker on loopback over mutual TLS with a bearer token.

    python run.py [key=value ...]        (in this directory; overrides go to the coordinator)

It writes certificates (make_certs.py) and a token file into ``certs/``, starts
``dpeft coordinator`` with TLS, client-certificate checking and the token file, then one
``dpeft worker`` that dials it with the CA, its own certificate and its token, and waits for the
run to finish. On two machines, run the same two commands with the coordinator's address.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from make_certs import make_certs

HERE = Path(__file__).resolve().parent
CERTS = Path(os.environ.get("CERTS_DIR", HERE / "certs"))  # where the certificates and tokens go
WORKER = "edge-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(overrides: list[str]) -> int:
    make_certs(CERTS, [WORKER])
    token = secrets.token_urlsafe(32)
    tokens = CERTS / "tokens.yaml"
    tokens.write_text(f"{WORKER}: {token}\n")
    tokens.chmod(0o600)
    (CERTS / f"{WORKER}.token").write_text(token + "\n")
    address = f"127.0.0.1:{free_port()}"
    dpeft = [sys.executable, "-m", "dpeft_launch.cli"]
    coordinator = subprocess.Popen(
        [*dpeft, "coordinator", "--config", str(HERE / "config.yaml"), "--listen", address, "--fresh",
         "--tls-cert", str(CERTS / "server.pem"), "--tls-key", str(CERTS / "server.key"),
         "--tls-client-ca", str(CERTS / "ca.pem"), "--tokens-file", str(tokens), *overrides]
    )  # fmt: skip
    worker = subprocess.Popen(
        [*dpeft, "worker", "--coordinator", address, "--worker-id", WORKER, "--threads", "1",
         "--ca", str(CERTS / "ca.pem"), "--cert", str(CERTS / f"{WORKER}.pem"), "--key", str(CERTS / f"{WORKER}.key"),
         "--token-file", str(CERTS / f"{WORKER}.token")],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        code = coordinator.wait()
        worker_code = worker.wait(timeout=60)
    finally:
        for p in (worker, coordinator):
            if p.poll() is None:
                p.terminate()
                p.wait()
    print(f"coordinator exited {code}, worker exited {worker_code}")
    return code or worker_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
