"""``python secagg_slow_worker.py ADDRESS WORKER_ID``: a real dpeft worker process over gRPC (the
loop of `dpeft worker`) whose clients reply late as the run's ``simulate.speed_factors`` say
(:func:`dpeft_workers.simulate.simulated_worker`), so a test can make a client miss a deadline
after it has masked its update."""

from __future__ import annotations

import sys

from dpeft.transport.grpc import GrpcWorkerConnection
from dpeft_workers.loop import serve_until_terminated
from dpeft_workers.simulate import simulated_worker

if __name__ == "__main__":
    address, worker_id = sys.argv[1], sys.argv[2]
    sys.exit(serve_until_terminated(GrpcWorkerConnection(address, patience_s=60.0), worker_id, threads=1, wrap=simulated_worker))
