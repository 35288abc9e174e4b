"""Programs of the cross-process cut-upload test, each run as its own process.

``proxy LISTEN_PORT_FILE UPSTREAM CUT_AFTER``: a TCP forwarder on loopback. The first
connection is cut (both sockets shut down, as a dropped network would) once ``CUT_AFTER``
bytes went from the client to the upstream; later connections are forwarded untouched. It
writes its port to ``LISTEN_PORT_FILE`` and reports the cut on stdout.

``worker ADDRESS SIZE_MIB CHUNK_BYTES``: a real dpeft worker connection
(:class:`~dpeft.transport.grpc.GrpcWorkerConnection`) that joins, polls one task,
fetches its payload and uploads a deterministic update (:func:`update_state`); it logs the
transport's own lines to stderr and prints one JSON line with its counters.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


def update_state(size_mib: int) -> Any:
    """The seeded AdapterState the worker uploads (``size_mib`` MiB of float32 in two tensors)."""
    import torch  # not at module level: the proxy process starts without torch

    from dpeft.state import AdapterState

    g = torch.Generator().manual_seed(7)
    n = size_mib * (1 << 20) // 4
    return AdapterState(
        OrderedDict([("a.weight", torch.randn(n - 1024, generator=g)), ("b.weight", torch.randn(1024, generator=g))]), {}
    )


def _pump(src: socket.socket, dst: socket.socket, budget: list[int] | None, cut: threading.Event, report: list[int]) -> None:
    try:
        while not cut.is_set():
            data = src.recv(1 << 16)
            if not data:
                break
            if budget is not None:
                if len(data) >= budget[0]:
                    dst.sendall(data[: budget[0]])
                    report.append(budget[0])
                    cut.set()
                    break
                budget[0] -= len(data)
                report.append(len(data))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxy(port_file: str, upstream: str, cut_after: int) -> None:
    host, port = upstream.rsplit(":", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    first = True
    while True:
        client, _ = srv.accept()
        up = socket.create_connection((host, int(port)))
        cut = threading.Event()
        sent: list[int] = []
        budget = [cut_after] if first else None
        if first:

            def announce(cut: threading.Event = cut, sent: list[int] = sent) -> None:
                cut.wait()
                print(json.dumps({"cut_after_bytes": sum(sent)}), flush=True)

            threading.Thread(target=announce, daemon=True).start()
        first = False
        threading.Thread(target=_pump, args=(client, up, budget, cut, sent), daemon=True).start()
        threading.Thread(target=_pump, args=(up, client, None, cut, []), daemon=True).start()


def worker(address: str, size_mib: int, chunk_bytes: int) -> None:
    from dpeft.codec import encode_state
    from dpeft.transport.base import TrainTask
    from dpeft.transport.grpc import GrpcWorkerConnection

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    payload = encode_state(update_state(size_mib))
    conn = GrpcWorkerConnection(address, chunk_bytes=chunk_bytes, patience_s=30, heartbeat=False)
    try:
        conn.join("cut-worker", None)
        task = conn.poll()
        while not isinstance(task, TrainTask):
            task = conn.poll()
        conn.fetch(task)
        accepted, reason = conn.push(task, payload, 10, {})
        print(
            json.dumps(
                {
                    "accepted": accepted,
                    "reason": reason,
                    "size": len(payload),
                    "bytes_up": conn.bytes_up,
                    "bytes_resent": conn.bytes_resent,
                }
            ),
            flush=True,
        )
    finally:
        conn.leave()


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        proxy(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
