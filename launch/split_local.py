"""Processes of split mode: the cloud server, an edge, and a local simulation (cloud + N edges)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dpeft.config import RunConfig
from dpeft.errors import ConfigError, DpeftError
from dpeft.rounds.plots import prewarm as prewarm_plots
from dpeft.split.config import SplitConfig
from dpeft.split.service import (
    CloudService,
    EdgeData,
    EdgeReport,
    Federation,
    cloud_model_from_config,
    config_yaml,
    configs_from_yaml,
    edge_model_from_config,
    handshake,
    num_labels_for,
    run_edge_session,
)
from dpeft.transport.split_stream import EdgeConnection, SplitServer
from dpeft_launch.procs import stop_processes

log = logging.getLogger("dpeft.split")


def start_cloud(run: RunConfig, split: SplitConfig, listen: str, run_dir: Path | None = None, resume: bool = True) -> tuple[SplitServer, CloudService]:
    """Build the cloud half of the model and serve it (federated rounds when split.federated).

    A federated cloud with a ``run_dir`` checkpoints every round there and, with ``resume``,
    continues from the newest readable checkpoint (like ``dpeft simulate``).
    """
    torch.set_num_threads(split.cloud_threads)
    num_labels = num_labels_for(run)
    cloud = cloud_model_from_config(run, split, num_labels)
    federation = None
    if split.federated:
        from dpeft.adapters import export_peft_dir, extract_state

        export = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_yaml(run, split, for_edges=True))  # no token on disk

            def export(state):  # the cloud's model keeps its peft structure: export works unchanged
                export_peft_dir(cloud.model, state, run_dir / "adapter")

        federation = Federation(run, split, extract_state(cloud.model), run_dir, export, resume=resume)  # says when it resumed
    service = CloudService(cloud, run, split, federation)
    server = SplitServer(service.handle, listen, chunk_bytes=split.chunk_bytes, max_sessions=max(8, split.edges + 2)).start()
    log.info("split cloud listening on %s (%d LoRA sites in %d groups)", server.address, len(cloud.sites), len(cloud.groups))
    return server, service


def _edge_data(run: RunConfig, split: SplitConfig, tokenizer, shard: int | None, data_path: str | None, client_id: int) -> EdgeData:
    from dpeft.data import load_client_file, load_run_data, tokenize

    if data_path:
        own = load_client_file(run, data_path, None)
        tok = tokenize(tokenizer, own.texts, own.labels, run.model.max_length)
        return EdgeData(tok, list(range(len(own))), None, len(own.label_names))
    data = load_run_data(run, n_clients=split.edges, tokenizer=tokenizer)
    train, test, parts = data.train, data.test, data.partitions
    which = client_id if shard is None else shard
    if not 0 <= which < len(parts):
        raise ConfigError("--shard", f"must be in [0, {len(parts)})")
    idx = parts[which]
    sub = train.subset(idx)
    tok = tokenize(tokenizer, sub.texts, sub.labels, run.model.max_length)
    test_tok = tokenize(tokenizer, test.texts, test.labels, run.model.max_length)
    return EdgeData(tok, list(range(len(sub))), test_tok, len(train.label_names))


def run_edge(
    address: str,
    edge_id: str,
    token: str = "",
    shard: int | None = None,
    data_path: str | None = None,
    threads: int = 1,
    patience_s: float = 60.0,
    run_dir: str | None = None,
    state_dir: str | None = None,
) -> EdgeReport:
    """One edge process: connect, receive the config, build the edge half, train, say goodbye.

    ``state_dir``: where this edge keeps its private training state between rounds, so a
    resumed federated run continues exactly (see :mod:`dpeft.split.checkpoint`).
    """
    torch.set_num_threads(threads)
    conn = EdgeConnection(address, patience_s=patience_s)
    try:
        welcome = handshake(conn.channel, edge_id, token)
        run, split = configs_from_yaml(welcome.fields["config_yaml"])
        conn.channel.chunk_bytes = split.chunk_bytes
        conn.channel.set_wire_dtype(split.wire_dtype)
        from dpeft.adapters.model import load_tokenizer

        tokenizer = load_tokenizer(run.model)
        data = _edge_data(run, split, tokenizer, shard, data_path, int(welcome.fields["client_id"]))
        edge, _ = edge_model_from_config(run, split, data.num_labels)
        report = run_edge_session(conn.channel, welcome, edge, data, run, split, edge_id, Path(state_dir) if state_dir else None)
        if run_dir and not welcome.fields["federated"]:
            _export_edge(edge, run, split, data.num_labels, Path(run_dir))
        return report
    finally:
        conn.close()


def _export_edge(edge, run: RunConfig, split: SplitConfig, num_labels: int, run_dir: Path) -> None:
    """Write the edge's own adapter as a PEFT directory (non-federated runs)."""
    from dpeft.adapters import build_model, export_peft_dir
    from dpeft.split.spec import slice_layers

    bundle = build_model(run.model, run.adapter, num_labels, run.seed)
    if split.layers:
        slice_layers(bundle.model, split.layers)
    run_dir.mkdir(parents=True, exist_ok=True)
    export_peft_dir(bundle.model, edge.state(), run_dir / "adapter")


class EdgeProcesses:
    """Local edge processes started by ``dpeft split simulate`` (cleaned up on exit)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: pids this launcher ended after the federation had finished (their work was recorded)
        self.ended_by_us: set[int] = set()

    def start(self, address: str, count: int, threads: int, run_dir: Path, token: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cmd = [sys.executable, "-m", "dpeft_launch.cli", "split", "edge", "--cloud", address, "--shard", str(i), "--edge-id", f"edge-{i}", "--threads", str(threads), "--patience", "30", "--exit-with-parent"]
            cmd += ["--state-dir", str(run_dir / "edges" / f"edge-{i}")]
            if token:
                cmd += ["--token", token]
            with open(logs / f"edge-{i}.log", "wb") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))

    def failed(self) -> str | None:
        for i, p in enumerate(self.procs):
            rc = p.poll()
            if rc not in (None, 0) and p.pid not in self.ended_by_us:
                return f"edge process edge-{i} (pid {p.pid}) exited with code {rc}; see logs/edge-{i}.log"
        return None

    def done(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def stop(self, grace_s: float = 10.0) -> None:
        """Give the edges ``grace_s`` to exit on their own (the federation is over), then end the
        rest; those are not failures: every round they trained is already recorded."""
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        late = [p for p in self.procs if p.poll() is None]
        for p in late:
            log.warning("edge process pid %d still running %.0f s after the federation finished: ending it", p.pid, grace_s)
        self.ended_by_us.update(p.pid for p in late)
        stop_processes(self.procs, 0.0)


def run_cloud(run: RunConfig, split: SplitConfig, listen: str, local_edges: int = 0, resume: bool = True, quiet: bool = False) -> list[dict]:
    """Serve until the federation finishes (with ``local_edges`` edge processes for simulate).

    Returns the metrics rows (federated) and prints the end-of-run summary like ``dpeft
    simulate`` (table, plots next to metrics.jsonl) unless ``quiet``.
    """

    if local_edges and not split.federated:
        raise ConfigError("split.federated", "simulate runs federated rounds; set split.federated=true")
    t_start = time.time()
    run_dir = Path(run.run_dir)
    server, service = start_cloud(run, split, listen, run_dir if split.federated else None, resume=resume)
    fed = service.federation
    edges = EdgeProcesses()
    try:
        if fed is not None and fed.round >= fed.rounds:
            print(f"dpeft split: {run_dir} already holds all {fed.rounds} rounds (use --fresh to start over)", file=sys.stderr, flush=True)
        else:
            if local_edges:
                if fed is not None:
                    fed.reserve([f"edge-{i}" for i in range(local_edges)])  # edge-i is client i (and shard i)
                edges.start(server.address, local_edges, split.edge_threads, run_dir, split.token)
            else:
                print(f"dpeft split cloud listening on {server.address}", file=sys.stderr, flush=True)
            if not quiet and fed is not None:
                prewarm_plots()
            while True:
                if service.finished.wait(0.5):
                    break
                if local_edges:
                    msg = edges.failed()
                    if msg:
                        raise DpeftError(msg)
                    if edges.done() and not service.finished.wait(10.0):
                        raise DpeftError("every edge process exited before the federation finished; see logs/")
                if fed is not None and fed.failed:
                    raise DpeftError(fed.failed)
            if local_edges:
                edges.stop()
                msg = edges.failed()
                if msg:
                    raise DpeftError(msg)
    finally:
        edges.stop(grace_s=2.0)
        server.stop(1.0)
    if fed is None:
        return []
    fed.flush()
    if not quiet and fed.metrics is not None:
        fed.metrics.print_summary(fed.rows, t_start)
    return fed.rows
