"""`dpeft` command line: simulate, coordinator, worker.

Exit codes: 0 done, 2 bad config or arguments (message names the key), 1 other failure,
130 interrupted. Errors print one clear line, never a bare traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with a one-line message
        self.print_usage(sys.stderr)
        print(f"dpeft: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dpeft", description="Distributed and federated parameter-efficient fine-tuning.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per event")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="coordinator + local worker processes on loopback gRPC")
    s.add_argument("--config", help="YAML run config (every key is optional)")
    s.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=10 adapter.r=16")

    c = sub.add_parser("coordinator", help="serve a run to remote workers")
    c.add_argument("--config", help="YAML run config")
    c.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any free port)")
    c.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    c.add_argument("overrides", nargs="*", metavar="key=value")

    w = sub.add_parser("worker", help="train tasks for a coordinator (dials out)")
    w.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    w.add_argument("--token", default="", help="bearer token for this worker")
    w.add_argument("--worker-id", default=None, help="stable worker id (default: hostname-pid)")
    w.add_argument("--data", default=None, help="your own CSV/JSONL data (this worker becomes one client)")
    w.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads")
    w.add_argument("--patience", type=float, default=120.0, help="seconds to keep retrying an unreachable coordinator")
    w.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    for module in _extension_modules():
        module.add_parser(sub)
    return p


#: Subcommands that live in their own modules: each has ``add_parser(subparsers)`` (setting
#: ``set_defaults(extension=module_name)``) and ``run(args) -> int``.
EXTENSIONS = ("dpeft.launch.split_cli", "dpeft.launch.ray_cli")


def _extension_modules() -> list:
    import importlib

    out = []
    for name in EXTENSIONS:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return out


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    import warnings

    if not args.debug:
        warnings.filterwarnings("ignore")


def _run(args: argparse.Namespace) -> int:
    from dpeft.config import load_config

    if getattr(args, "extension", None):
        import importlib

        return int(importlib.import_module(args.extension).run(args))

    if args.command in ("simulate", "coordinator"):
        cfg = load_config(args.config, args.overrides)
        from dpeft.launch.coordinator import run_coordinator

        if args.command == "simulate":
            run_coordinator(cfg, "127.0.0.1:0", local_workers=cfg.simulate.processes, resume=not args.fresh)
        else:
            run_coordinator(cfg, args.listen, local_workers=0, resume=not args.fresh)
        return 0
    if args.threads < 1:
        raise _config_error("--threads", "must be >= 1")
    from dpeft.transport.grpc_worker import GrpcWorkerConnection
    from dpeft.workers.loop import run_worker

    if args.exit_with_parent:
        _exit_with_parent()
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    conn = GrpcWorkerConnection(args.coordinator, token=args.token, patience_s=args.patience)
    return run_worker(conn, worker_id, threads=args.threads, data_path=args.data, stop=threading.Event())


def _exit_with_parent() -> None:
    """Simulation workers end when the process that started them is gone (even after SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        import time

        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _config_error(key: str, problem: str) -> Exception:
    from dpeft.errors import ConfigError

    return ConfigError(key, problem)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dpeft` command."""
    args = _parser().parse_args(argv)
    _configure_logging(args)
    from dpeft.errors import DpeftError

    try:
        return _run(args)
    except KeyboardInterrupt:
        print("dpeft: interrupted", file=sys.stderr)
        return 130
    except DpeftError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dpeft: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConnectionError as exc:
        print(f"dpeft: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence: one clear line, then exit 1
        if args.debug:
            traceback.print_exc()
        print(f"dpeft: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
