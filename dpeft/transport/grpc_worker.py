"""Former home of the gRPC worker connection, kept as an import path for existing callers:
the code lives in :mod:`dpeft.transport.grpc.worker`."""

from dpeft.transport.grpc.worker import AuthRefused, CoordinatorGone, GrpcWorkerConnection, wire_crc

__all__ = ["AuthRefused", "CoordinatorGone", "GrpcWorkerConnection", "wire_crc"]
