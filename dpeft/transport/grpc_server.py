"""Former home of the gRPC coordinator transport, kept as an import path for existing callers:
the code lives in :mod:`dpeft.transport.grpc` (and :mod:`dpeft.transport.events`)."""

from dpeft.transport.events import log_event
from dpeft.transport.grpc.channel import SERVICE_NAME, channel_options
from dpeft.transport.grpc.payloads import FramedBlob
from dpeft.transport.grpc.server import GrpcCoordinatorTransport

__all__ = ["SERVICE_NAME", "FramedBlob", "GrpcCoordinatorTransport", "channel_options", "log_event"]
