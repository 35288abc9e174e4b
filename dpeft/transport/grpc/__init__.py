"""The gRPC transport: a coordinator that workers dial into.

- :mod:`.channel`: channel options, retry backoff, the service name;
- :mod:`.payloads`: published payloads (framed blobs, chunk CRCs, pruning);
- :mod:`.uploads`: resumable, CRC-checked uploads fed into the engine's validating decoder;
- :mod:`.servicer`: the RPC handlers (thin: they delegate to the pieces above);
- :mod:`.server`: :class:`~.server.GrpcCoordinatorTransport` (the coordinator side);
- :mod:`.worker`: :class:`~.worker.GrpcWorkerConnection` (the worker side).

Protobuf messages are built and read only in :mod:`dpeft.transport.serde`.
"""

from dpeft.transport.grpc.channel import SERVICE_NAME, channel_options
from dpeft.transport.grpc.payloads import FramedBlob, FramedSpool
from dpeft.transport.grpc.server import GrpcCoordinatorTransport
from dpeft.transport.grpc.worker import AuthRefused, CoordinatorGone, GrpcWorkerConnection, wire_crc

__all__ = [
    "SERVICE_NAME",
    "AuthRefused",
    "CoordinatorGone",
    "FramedBlob",
    "FramedSpool",
    "GrpcCoordinatorTransport",
    "GrpcWorkerConnection",
    "channel_options",
    "wire_crc",
]
