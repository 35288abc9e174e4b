"""The gRPC transport: a coordinator that workers dial into.

- :mod:`.channel`: channel options, retry backoff, the service name;
- :mod:`.payloads`: published payloads (framed blobs, chunk CRCs, pruning);
- :mod:`.uploads`: resumable, CRC-checked uploads fed into the engine's validating decoder;
- :mod:`.servicer`: the RPC handlers (thin: they delegate to the pieces above);
- :mod:`.server`: :class:`~.server.GrpcCoordinatorTransport` (the coordinator side);
- :mod:`.worker`: :class:`~.worker.GrpcWorkerConnection` (the worker side).

Protobuf messages are built and read only in :mod:`dpeft.transport.serde`.
"""
