"""`dpeft` command line: simulate, coordinator, worker, status, certs.

Exit codes: 0 done, 2 bad config or arguments (message names the key), 1 other failure,
130 interrupted. Errors print one clear line, never a bare traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 2 with a one-line message
        self.print_usage(sys.stderr)
        print(f"dpeft: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _client_args(p: argparse.ArgumentParser) -> None:
    """Credentials of a process that dials the coordinator (worker, status)."""
    p.add_argument("--token", default=None, help="bearer token (default: $DPEFT_TOKEN; prefer --token-file or the variable, a flag shows in ps)")
    p.add_argument("--token-file", default=None, help="file whose first line is the bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    p.add_argument("--ca", default=None, help="PEM CA that signed the coordinator's certificate (implies --tls)")
    p.add_argument("--cert", default=None, help="PEM client certificate for mutual TLS (implies --tls)")
    p.add_argument("--key", default=None, help="PEM client private key for mutual TLS")
    p.add_argument("--server-name", default=None, help="expected name in the coordinator's certificate, if not the host you dial")


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin", action="append", default=None, metavar="MODULE", help="import this plug-in module first (repeatable; = plugins: [MODULE], so workers import it too)"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dpeft", description="Distributed and federated parameter-efficient fine-tuning.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per event")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="coordinator + local worker processes on loopback gRPC")
    s.add_argument("--config", help="YAML run config (every key is optional)")
    s.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    _plugin_arg(s)
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=10 adapter.r=16")

    c = sub.add_parser("coordinator", help="serve a run to remote workers")
    c.add_argument("--config", help="YAML run config")
    c.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any free port)")
    c.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    c.add_argument("--tls-cert", help="PEM server certificate (= auth.tls_cert)")
    c.add_argument("--tls-key", help="PEM server private key (= auth.tls_key)")
    c.add_argument("--tls-client-ca", help="PEM CA: require worker certificates signed by it (= auth.tls_client_ca)")
    c.add_argument("--tokens-file", help="YAML/JSON worker id -> token, re-read on change (= auth.tokens_file)")
    _plugin_arg(c)
    c.add_argument("overrides", nargs="*", metavar="key=value")

    w = sub.add_parser("worker", help="train tasks for a coordinator (dials out)")
    w.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    w.add_argument("--worker-id", default=None, help="stable worker id (default: hostname-pid); the one your token was issued for")
    w.add_argument("--data", default=None, help="your own CSV/JSONL data (this worker becomes one client)")
    w.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads")
    w.add_argument("--patience", type=float, default=120.0, help="seconds to keep retrying an unreachable coordinator")
    w.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--simulated", action="store_true", help=argparse.SUPPRESS)  # a `dpeft simulate` worker: simulate.* heterogeneity
    w.add_argument("--device", default=None, help="train on this device: auto, cpu, cuda, cuda:N or mps (default: the run's train.device)")
    w.add_argument("--device-slot", type=int, default=None, help=argparse.SUPPRESS)  # a simulate worker's number: its GPU among several
    w.add_argument("--device-key", default="--device", help=argparse.SUPPRESS)  # the config key a simulate worker's --device came from
    _plugin_arg(w)
    _client_args(w)

    st = sub.add_parser("status", help="workers, round and progress of a running coordinator")
    st.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    st.add_argument("--worker-id", default="admin", help="the id the token was issued for (default: admin)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _client_args(st)

    ce = sub.add_parser("certs", help="write a self-signed test CA, a server certificate and client certificates")
    ce.add_argument("--out", required=True, help="directory to write ca.pem, server.pem/.key, client.pem/.key into")
    ce.add_argument("--host", action="append", default=None, help="server DNS name or IP (repeat; default: localhost and 127.0.0.1)")
    ce.add_argument("--client", action="append", default=None, help="client certificate name (repeat; default: client)")
    ce.add_argument("--days", type=int, default=365, help="validity in days")
    ce.add_argument("--tokens", default=None, help="comma-separated worker ids: also write tokens.yaml with a fresh token for each")
    for module in _extension_modules():
        module.add_parser(sub)
    return p


#: Subcommands that live in their own modules: each has ``add_parser(subparsers)`` (setting
#: ``set_defaults(extension=module_name)``) and ``run(args) -> int``.
EXTENSIONS = ("dpeft_launch.split_cli", "dpeft_launch.ray_cli", "dpeft_launch.config_cli")


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
    from dpeft.validate import load_config

    if getattr(args, "extension", None):
        import importlib

        return int(importlib.import_module(args.extension).run(args))

    from dpeft_launch import api

    if args.command in ("simulate", "coordinator"):
        overrides = list(args.overrides)
        if args.command == "coordinator":
            for flag, key in (("tls_cert", "auth.tls_cert"), ("tls_key", "auth.tls_key"), ("tls_client_ca", "auth.tls_client_ca"), ("tokens_file", "auth.tokens_file")):
                if getattr(args, flag):
                    overrides.append(f"{key}={os.path.abspath(getattr(args, flag))}")
        cfg = load_config(args.config, overrides, plugins=args.plugin or ())
        if args.command == "simulate" and cfg.aggregation == "allreduce":
            from dpeft_launch.allreduce_local import run_local_allreduce

            return run_local_allreduce(cfg, resume=not args.fresh)  # the ranks' own exit code (a config error printed by a rank: 2)
        if args.command == "simulate":
            api.simulate(cfg, fresh=args.fresh)
        else:
            logging.getLogger("dpeft.events").setLevel(logging.DEBUG if args.debug else logging.INFO)
            api.serve(cfg, listen=args.listen, fresh=args.fresh)
        return 0
    if args.command == "certs":
        return _certs(args)
    if args.command == "status":
        return _status(args)
    if args.threads < 1:
        raise _config_error("--threads", "must be >= 1")
    if args.exit_with_parent:
        from dpeft_launch.procs import exit_with_parent

        exit_with_parent()
    wrap: Callable[..., Any] | None = None
    if args.simulated:
        from dpeft_workers.simulate import simulated_worker as wrap
    if args.device is not None:
        from dpeft.train.device import check_device_spec

        check_device_spec("--device", args.device)
    from dpeft.plugins import load_plugins

    load_plugins(args.plugin or ())
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    conn = _connect(args, worker_id, patience_s=args.patience)
    return api.serve_worker(
        conn, worker_id, threads=args.threads, data=args.data, device=args.device, device_slot=args.device_slot, device_key=args.device_key, wrap=wrap
    )


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                return fh.readline().strip()
        except OSError as exc:
            raise _config_error("--token-file", f"cannot read {args.token_file}: {exc.strerror}") from None
    return args.token if args.token is not None else os.environ.get("DPEFT_TOKEN", "")


def _connect(args: argparse.Namespace, worker_id: str, patience_s: float):
    from dpeft_launch.api import connect

    return connect(
        args.coordinator,
        worker_id,
        token=_token(args),
        tls=args.tls,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
        patience_s=patience_s,
    )


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    conn = _connect(args, args.worker_id, patience_s=5.0)
    try:
        st = conn.status()
    finally:
        conn.channel.close()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    total = f"/{st['total_rounds']}" if st["total_rounds"] else ""
    print(
        f"run {st['run_id']}  round {st['round']}{total}: {st['tasks_done']}/{st['tasks_submitted']} tasks done, "
        f"{st['tasks_inflight']} in flight, {st['tasks_pending']} queued, {st['uploads_partial']} partial uploads; "
        f"{st['rejected']} rejected; up {st['bytes_up']} B, down {st['bytes_down']} B; uptime {st['uptime_s']:.0f}s"
        + (f"; stopping: {st['stop_reason']}" if st["stop_reason"] else "")
    )
    rows = [("worker", "state", "last seen", "tasks", "bytes up", "bytes down", "clients", "current task")]
    now = time.time()
    for w in st["workers"]:
        seen = f"{now - w['last_seen']:.1f}s ago" if w["last_seen"] else "-"
        clients = ",".join(map(str, w["client_ids"])) if w["own_data"] else "virtual"
        rows.append((w["worker_id"], w["state"], seen, str(w["tasks_done"]), str(w["bytes_up"]), str(w["bytes_down"]), clients, w["current_task"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return 0


def _certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dpeft.transport.tls import make_test_certs

    paths = make_test_certs(args.out, hosts=args.host, client_names=args.client, days=args.days)
    if args.tokens:
        import yaml

        from dpeft.transport.auth import new_token

        ids = [w.strip() for w in args.tokens.split(",") if w.strip()]
        path = os.path.join(args.out, "tokens.yaml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump({w: new_token() for w in ids}, fh, sort_keys=False)
        paths.append(Path(path))
    for p in paths:
        print(p)
    print("test certificates only: see the documentation's 'Deploy edge workers' guide for real deployments", file=sys.stderr)
    return 0


def _config_error(key: str, problem: str) -> Exception:
    from dpeft.errors import ConfigError

    return ConfigError(key, problem)


#: glibc tunables a training process starts with: no per-thread cache of small blocks (tcache).
#: Cached small blocks stay allocated between the activations a step frees, so the heap cannot
#: coalesce them: a simulate worker on the default task held 468 MiB instead of 337, at the
#: same speed (benchmarks/worker_memory.py).
#: glibc malloc settings for training commands (each one the user sets in GLIBC_TUNABLES wins):
#: no per-thread cache of small blocks (resident memory); one arena, so tensors freed by the
#: coordinator's evaluation thread or gRPC threads are reused instead of living in 64 MiB thread
#: heaps that glibc unmaps and maps again batch after batch; a fixed mmap threshold at glibc's
#: 32 MiB ceiling and a trim threshold of 256 MiB, so a step's activations are not handed back to
#: the kernel and faulted in again at the next step (docs/guides/gpus-and-memory.md).
LEAN_TUNABLES = ":".join(
    [
        "glibc.malloc.tcache_count=0",
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_threshold=33554432",
        "glibc.malloc.trim_threshold=268435456",
    ]
)
_TRAINING_COMMANDS = {"simulate", "coordinator", "worker", "split", "ray"}


def lean_malloc_env(env: dict[str, str]) -> dict[str, str] | None:
    """``env`` with the LEAN_TUNABLES the user has not set added to GLIBC_TUNABLES, or None where
    nothing is to change: not glibc, ``DPEFT_LEAN_MALLOC=0`` in the environment (glibc's own
    defaults), or the user already chose every one of them (theirs win; set
    ``glibc.malloc.tcache_count=7`` for glibc's default cache, and so on)."""
    if env.get("DPEFT_LEAN_MALLOC", "") == "0":
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (ValueError, OSError):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    chosen = {item.partition("=")[0] for item in current.split(":") if item}
    missing = [item for item in LEAN_TUNABLES.split(":") if item.partition("=")[0] not in chosen]
    if not missing:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join([*([current] if current else []), *missing])}


def _reexec_lean(argv: list[str]) -> None:
    """Tunables are read when a process starts, so the command line starts itself again with them
    (same pid, arguments and streams) before anything heavy is imported; its worker processes
    inherit them."""
    if next((a for a in argv if not a.startswith("-")), None) not in _TRAINING_COMMANDS:
        return
    env = lean_malloc_env(dict(os.environ))
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # carry on with glibc's defaults


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with ``key=value`` words after an option (``config show --config f
    rounds=3``, ``--plugin m rounds=3``) taken as overrides: argparse closes the positionals of a
    subcommand at its first option."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dpeft` command."""
    if argv is None:  # a real command line, not a call from Python
        from dpeft_launch.quiet import quiet_defaults

        quiet_defaults()  # before gRPC/transformers load, inherited by the workers
        _reexec_lean(sys.argv[1:])
    args = parse_args(_parser(), argv)
    _configure_logging(args)
    return report_errors(lambda: _run(args), args.debug)


def report_errors(fn: Callable[[], int], debug: bool) -> int:
    """Run ``fn`` and map failures to exit codes with one clear line (tracebacks only with --debug)."""
    from dpeft.errors import DpeftError

    try:
        return fn()
    except KeyboardInterrupt:
        print("dpeft: interrupted", file=sys.stderr)
        return 130
    except DpeftError as exc:
        if debug:
            traceback.print_exc()
        print(f"dpeft: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConnectionError as exc:
        print(f"dpeft: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence: one clear line, then exit 1
        if debug:
            traceback.print_exc()
        print(f"dpeft: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
