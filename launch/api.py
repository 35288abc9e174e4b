"""The Python API: configure and run dpeft from a script or a notebook.

``dpeft.simulate``, ``dpeft.serve`` and ``dpeft.run_worker`` (exported lazily by the ``dpeft``
package) are the functions behind `dpeft simulate`, `dpeft coordinator` and `dpeft worker`::

    import dpeft

    cfg = dpeft.load_config("run.yaml", overrides=["rounds=3", "strategy=fedadam"])
    result = dpeft.simulate(cfg)
    print(result.final["eval_accuracy"], result.export_path)

A run prints the same progress as the command line. Ctrl-C (KeyboardInterrupt, SIGINT) or
SIGTERM stops it cleanly: local worker processes are told to leave and terminated, the gRPC
server stops, then KeyboardInterrupt propagates to the caller. Errors are
:class:`~dpeft.errors.DpeftError` (:class:`~dpeft.errors.ConfigError` names the config key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpeft.config import RunConfig
from dpeft.config.parse import merge_override, parse_override
from dpeft.errors import ConfigError, DpeftError
from dpeft.plugins import load_plugins
from dpeft.state import AdapterState
from dpeft.validate import config_from_dict, load_config

#: what the run functions accept as a config: a RunConfig, a YAML path, or None (every default)
ConfigLike = RunConfig | str | os.PathLike[str] | None


@dataclass(frozen=True)
class RunResult:
    """What a finished run returns."""

    #: one metrics row per round (the lines of ``metrics.jsonl``; round 0 is the initial adapter)
    rows: list[dict[str, Any]]
    #: the final global adapter state (None for ``aggregation=allreduce`` runs: read ``export_path``)
    adapter: AdapterState | None
    #: the exported PEFT adapter directory (``<run_dir>/adapter``), None if nothing was exported
    export_path: Path | None
    #: the run directory (metrics, checkpoints, logs, config.yaml)
    run_dir: Path
    #: the checkpointed round this run resumed from, None for a fresh start
    resumed_from: int | None
    #: wall-clock seconds of the call
    elapsed_s: float
    #: the validated config the run used
    config: RunConfig

    @property
    def final(self) -> dict[str, Any]:
        """The last round's metrics row (empty when no round ran)."""
        return self.rows[-1] if self.rows else {}

    def metric(self, name: str) -> list[Any]:
        """``name`` of every row that has it (e.g. ``eval_accuracy`` per evaluated round)."""
        return [row[name] for row in self.rows if name in row]


def resolve_config(config: ConfigLike = None, overrides: Sequence[str] = (), plugins: Sequence[str] = ()) -> RunConfig:
    """A validated RunConfig from a RunConfig, a YAML path or None, with ``key=value`` overrides
    applied and ``plugins`` imported and added to its ``plugins`` (so its workers import them too)."""
    if isinstance(config, RunConfig):
        tree = dataclasses.asdict(config)
        for text in overrides:
            keys, value = parse_override(text)
            merge_override(tree, keys, value)
        tree["plugins"] = [*tree.get("plugins", []), *(p for p in plugins if p not in tree.get("plugins", []))]
        return config_from_dict(tree)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a RunConfig, a YAML path or None, not {type(config).__name__}")
    return load_config(config, list(overrides), plugins=list(plugins))


def _rows_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _result(
    cfg: RunConfig, rows: list[dict[str, Any]], adapter: AdapterState | None, resumed_from: int | None, t0: float
) -> RunResult:
    run_dir = Path(cfg.run_dir)
    export = run_dir / "adapter"
    return RunResult(
        rows=list(rows),
        adapter=adapter,
        export_path=export if export.is_dir() else None,
        run_dir=run_dir,
        resumed_from=resumed_from,
        elapsed_s=time.monotonic() - t0,
        config=cfg,
    )


def simulate(
    config: ConfigLike = None,
    overrides: Sequence[str] = (),
    *,
    plugins: Sequence[str] = (),
    fresh: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run a whole federated run on this machine (`dpeft simulate`): a coordinator in this
    process and ``simulate.processes`` local workers over loopback gRPC (or all-reduce ranks with
    ``aggregation=allreduce``). ``fresh`` ignores checkpoints in ``run_dir`` (else the run resumes);
    ``quiet`` skips the summary table."""
    from dpeft_launch.simulate import serve_rounds

    cfg = resolve_config(config, overrides, plugins)
    t0 = time.monotonic()
    if cfg.aggregation == "allreduce":
        from dpeft_launch.allreduce_local import run_local_allreduce

        code = run_local_allreduce(cfg, resume=not fresh)
        if code == 2:
            raise ConfigError("aggregation", "an all-reduce rank refused the config (its message is above)")
        if code:
            raise DpeftError(f"all-reduce simulation failed (a rank exited with code {code}; see {Path(cfg.run_dir) / 'logs'})")
        return _result(cfg, _rows_of(Path(cfg.run_dir)), None, None, t0)
    served = serve_rounds(cfg, "127.0.0.1:0", local_workers=cfg.simulate.processes, resume=not fresh, quiet=quiet)
    return _result(cfg, served.rows, served.engine.global_state, served.engine.resumed_from, t0)


def serve(
    config: ConfigLike = None,
    overrides: Sequence[str] = (),
    *,
    listen: str = "127.0.0.1:50051",
    plugins: Sequence[str] = (),
    fresh: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Serve a run to remote workers (`dpeft coordinator`) on ``listen`` (HOST:PORT; port 0 = any
    free port) until its rounds are done. TLS and worker tokens come from ``auth.*``."""
    from dpeft_launch.simulate import serve_rounds

    cfg = resolve_config(config, overrides, plugins)
    t0 = time.monotonic()
    served = serve_rounds(cfg, listen, local_workers=0, resume=not fresh, quiet=quiet)
    return _result(cfg, served.rows, served.engine.global_state, served.engine.resumed_from, t0)


def connect(
    coordinator: str,
    worker_id: str,
    *,
    token: str | None = None,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    patience_s: float = 120.0,
) -> Any:
    """A gRPC connection of worker ``worker_id`` to ``coordinator`` (HOST:PORT); TLS when ``tls``
    or any of ``ca``/``cert``/``key`` is given; ``token`` defaults to ``$DPEFT_TOKEN``."""
    from dpeft.transport.grpc import GrpcWorkerConnection

    credentials = None
    if tls or ca or cert or key:
        from dpeft.transport.tls import channel_credentials

        credentials = channel_credentials(ca, cert, key)
    conn = GrpcWorkerConnection(
        coordinator,
        token=token if token is not None else os.environ.get("DPEFT_TOKEN", ""),
        patience_s=patience_s,
        credentials=credentials,
        server_name=server_name,
    )
    conn.worker_id = worker_id
    return conn


def run_worker(
    coordinator: str,
    *,
    worker_id: str | None = None,
    token: str | None = None,
    tls: bool = False,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    data: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    patience_s: float = 120.0,
    plugins: Sequence[str] = (),
) -> int:
    """Train tasks for the coordinator at ``coordinator`` until its run ends (`dpeft worker`); 0 when done.

    ``data``: this worker's own CSV/JSONL file (it becomes one client); ``device``: auto, cpu,
    cuda, cuda:N or mps (default: the run's ``train.device``). The run's config, with its
    ``plugins``, comes from the coordinator; ``plugins`` are imported first (modules only this
    machine has). In the main thread SIGTERM makes the worker leave between training steps."""
    threads = threads if threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise ConfigError("threads", "must be >= 1")
    if device is not None:
        from dpeft.train.device import check_device_spec

        check_device_spec("device", device)
    load_plugins(plugins)
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    conn = connect(
        coordinator, worker_id, token=token, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, patience_s=patience_s
    )
    return serve_worker(conn, worker_id, threads=threads, data=data, device=device)


def serve_worker(
    conn: Any,
    worker_id: str,
    *,
    threads: int,
    data: str | None = None,
    device: str | None = None,
    device_slot: int | None = None,
    device_key: str = "device",
    wrap: Any = None,
) -> int:
    """Serve tasks over ``conn`` (see :func:`connect`) until the run ends; 0 when done. In the main
    thread SIGTERM and Ctrl-C make the worker leave between training steps or after the transfer in
    progress (Ctrl-C then raises KeyboardInterrupt; the handlers are restored after)."""
    from dpeft_workers.loop import run_worker as worker_loop
    from dpeft_workers.loop import serve_until_terminated

    kwargs: dict[str, Any] = {
        "threads": threads,
        "data_path": data,
        "device": device,
        "device_slot": device_slot,
        "device_key": device_key,
        "wrap": wrap,
    }
    if threading.current_thread() is not threading.main_thread():
        return worker_loop(conn, worker_id, stop=threading.Event(), busy=threading.Event(), **kwargs)
    old = signal.getsignal(signal.SIGTERM)
    try:
        return serve_until_terminated(conn, worker_id, **kwargs)
    finally:
        signal.signal(signal.SIGTERM, old)


__all__ = ["ConfigLike", "RunResult", "connect", "resolve_config", "run_worker", "serve", "serve_worker", "simulate"]
