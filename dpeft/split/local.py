"""A cloud and an edge in one process over a real loopback gRPC stream (tests, benchmarks)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

from dpeft.config import RunConfig
from dpeft.split.cloud import CloudModel
from dpeft.split.config import SplitConfig
from dpeft.split.edge import EdgeModel
from dpeft.split.service import CloudService, handshake
from dpeft.transport.split_stream import EdgeConnection, SplitServer


@contextmanager
def loopback(model, run: RunConfig, split: SplitConfig, tap=None, federation=None, edge_model=None):
    """Yield (edge, channel, welcome, service) for a CloudModel on a deepcopy of ``model``.

    The edge gets another deepcopy (or ``edge_model``); the welcome's payload is not consumed.
    """
    cloud = CloudModel(copy.deepcopy(model))
    service = CloudService(cloud, run, split, federation)
    server = SplitServer(service.handle, "127.0.0.1:0", chunk_bytes=split.chunk_bytes, tap=tap).start()
    conn = EdgeConnection(server.address, chunk_bytes=split.chunk_bytes, wire_dtype=split.wire_dtype, patience_s=10, tap=tap)
    try:
        welcome = handshake(conn.channel, "local-edge")
        edge = EdgeModel(edge_model if edge_model is not None else copy.deepcopy(model), run.train, split.kr)
        yield edge, conn.channel, welcome, service
    finally:
        conn.leave()
        server.stop(0.5)
