"""Federated rounds aggregated by torch.distributed all-reduce, one rank per process.

    torchrun --nproc-per-node 2 -m dpeft_launch.torchrun_allreduce --config run.yaml rounds=5

torchrun exports ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; this
module calls ``init_process_group`` (gloo on CPU, nccl on GPU unless ``--backend``), and
every rank trains its share of each round's sampled clients on its own device (``train.device``
or ``--device``; a bare ``cuda`` or ``auto`` means GPU ``LOCAL_RANK``); rank 0 writes the run directory.
Multi-node: ``torchrun --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500
--nproc-per-node G -m dpeft_launch.torchrun_allreduce ...`` on each node.
Exit codes as for ``dpeft``: 0 done, 2 bad config, 1 other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpeft_launch.torchrun_allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML run config (every key optional; a ray: section is ignored)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="process-group backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--device", default=None, help="train on this device (default: train.device; a bare cuda or auto takes GPU LOCAL_RANK)")
    p.add_argument("--device-key", default="--device", help=argparse.SUPPRESS)  # the config key --device came from (dpeft simulate)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cpus / local world size)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    p.add_argument("--exit-with-parent", action="store_true", help="end when the launching process is gone (used by `dpeft simulate`)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    from dpeft_launch.cli import report_errors
    from dpeft_launch.procs import exit_with_parent

    if args.exit_with_parent:
        exit_with_parent()

    def run() -> int:
        import torch.distributed as dist

        from dpeft.rounds.allreduce import run_allreduce
        from dpeft.train.device import resolve_device
        from dpeft.transport.distributed_allreduce import init_group
        from dpeft.validate import load_config
        from dpeft_workers.runtime import WorkerRuntime, set_threads
        from dpeft_workers.simulate import Heterogeneity

        cfg = load_config(args.config, args.overrides, allreduce="torchrun_allreduce")  # a ray: section is accepted and ignored
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        set_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, local)))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        key = args.device_key if args.device else "train.device"
        device = resolve_device(args.device or cfg.train.device, local_rank, key)  # before the group: nccl needs it
        init_group(args.backend, device=device)
        try:
            runtime = WorkerRuntime(cfg, device=str(device), local_index=local_rank, device_key=key)
            run_allreduce(cfg, Heterogeneity(cfg).install(runtime), resume=not args.fresh, quiet=dist.get_rank() != 0)
        finally:
            dist.destroy_process_group()
        return 0

    return report_errors(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
