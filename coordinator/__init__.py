"""The coordinator service: round engine, global model, checkpoints, metrics. No grpc/ray imports."""
