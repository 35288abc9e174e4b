"""Transports: how tasks reach workers and updates come back (gRPC here; Ray and
torch.distributed plug into the same interfaces). No aggregation math lives here."""

from dpeft.transport.base import CoordinatorTransport, TaskResult, TrainTask, WorkerConnection, WorkerRegistration

__all__ = ["CoordinatorTransport", "TaskResult", "TrainTask", "WorkerConnection", "WorkerRegistration"]
