"""`dpeft split ...`: DLoRA split training (cloud holds the frozen base, edges hold LoRA + data).

    dpeft split simulate [--config FILE] [--fresh] [key=value ...]    one cloud + split.edges edge processes
    dpeft split cloud --listen HOST:PORT [--config FILE] [--fresh] [key=value ...]
    dpeft split edge --cloud HOST:PORT [--data FILE | --shard I] [--token T] [--state-dir DIR]

A federated cloud checkpoints every round under run_dir and resumes from there unless --fresh.
"""

from __future__ import annotations

import argparse
import os
import socket

MODULE = "dpeft_launch.split_cli"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("split", help="DLoRA split training: frozen base on the cloud, LoRA + data on the edge")
    p.set_defaults(extension=MODULE)
    sub = p.add_subparsers(dest="split_command", required=True, parser_class=type(p))

    s = sub.add_parser("simulate", help="one cloud + split.edges edge processes on loopback gRPC")
    s.add_argument("--config", help="YAML run config with an optional split: section")
    s.add_argument("--fresh", action="store_true", help="ignore (and remove) checkpoints already in run_dir")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. rounds=3 split.edges=2 split.kr.enabled=true")
    s.set_defaults(extension=MODULE)

    c = sub.add_parser("cloud", help="serve the frozen base to edges")
    c.add_argument("--config", help="YAML run config with an optional split: section")
    c.add_argument("--listen", default="127.0.0.1:50061", help="HOST:PORT to listen on (port 0 = any free port)")
    c.add_argument("--fresh", action="store_true", help="ignore (and remove) checkpoints already in run_dir")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(extension=MODULE)

    e = sub.add_parser("edge", help="train LoRA factors on private data through a split cloud (dials out)")
    e.add_argument("--cloud", required=True, help="HOST:PORT of the split cloud")
    e.add_argument("--data", default=None, help="your own CSV/JSONL file (text and label columns per the cloud's config)")
    e.add_argument("--shard", type=int, default=None, help="simulation: use shard I of the configured dataset (default: the client id the cloud assigns)")
    e.add_argument("--token", default="", help="bearer token the cloud expects")
    e.add_argument("--edge-id", default=None, help="stable edge id (default: hostname-pid)")
    e.add_argument("--threads", type=int, default=1, help="torch threads")
    e.add_argument("--patience", type=float, default=60.0, help="seconds to wait for the cloud")
    e.add_argument("--run-dir", default=None, help="write this edge's adapter here (non-federated clouds)")
    e.add_argument("--state-dir", default=None, help="keep this edge's training state (optimizer, Kill-and-Revive) here, so a resumed run continues exactly")
    e.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    e.set_defaults(extension=MODULE)


def run(args: argparse.Namespace) -> int:
    from dpeft.errors import ConfigError
    from dpeft.split.config import load_split_config

    cmd = args.split_command
    if cmd in ("simulate", "cloud"):
        from dpeft_launch.split_local import run_cloud

        run_cfg, split_cfg = load_split_config(args.config, args.overrides)
        from dpeft.privacy.secagg.checks import refuse_command

        refuse_command(run_cfg, "split")
        if cmd == "simulate":
            run_cloud(run_cfg, split_cfg, "127.0.0.1:0", local_edges=split_cfg.edges, resume=not args.fresh)
        else:
            run_cloud(run_cfg, split_cfg, args.listen, resume=not args.fresh)
        return 0
    if args.threads < 1:
        raise ConfigError("--threads", "must be >= 1")
    if args.data and args.shard is not None:
        raise ConfigError("--data", "give either --data or --shard, not both")
    if args.exit_with_parent:
        from dpeft_launch.procs import exit_with_parent

        exit_with_parent()
    from dpeft_launch.split_local import run_edge

    edge_id = args.edge_id or f"{socket.gethostname()}-{os.getpid()}"
    report = run_edge(args.cloud, edge_id, args.token, args.shard, args.data, args.threads, args.patience, args.run_dir, args.state_dir)
    steps = max(report.steps, 1)
    mean_up = sum(s.bytes_up for s in report.stats) / steps
    mean_down = sum(s.bytes_down for s in report.stats) / steps
    last = report.losses[-1] if report.losses else float("nan")
    print(f"edge {edge_id}: {report.steps} steps, last loss {last:.4f}, {mean_up / 1e6:.2f} MB up + {mean_down / 1e6:.2f} MB down per step")
    return 0
